"""The `deluceva` command line: compile, profile, run, streams, bench, bench-streams, explain, demo.

Every subcommand lives in its own module and is registered here; bad input ends in one line on
stderr naming the file and the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from deluceva.commands import _types as types
from deluceva.errors import DelucevaError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a refusal is one line (argparse prints its usage line first), status 2.

    Subcommand parsers are made with the parent's class, so they refuse the same way.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deluceva", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command module adds its own parser and sets `handler`.
    from deluceva.commands import register_all

    register_all(commands, percentage=types.percentage, positive_int=types.positive_int)
    return parser


def _terminate(signum, frame):
    """SIGTERM (a service manager, `kill`) stops a run as Ctrl-C does: outputs and summary written."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return int(args.handler(args) or 0)
    except DelucevaError as error:
        print(f"deluceva: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deluceva: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
