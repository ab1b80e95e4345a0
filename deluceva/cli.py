"""The `deluceva` command line: compile, profile, run, bench, explain, demo.

Every subcommand lives in its own module and is registered here; bad input ends in one line on
stderr naming the file and the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from deluceva.errors import DelucevaError

__all__ = ["main"]


def _percentage(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"percentage {value} is outside [0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deluceva", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command module adds its own parser and sets `handler`.
    from deluceva.commands import register_all

    register_all(commands, percentage=_percentage, positive_int=_positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except DelucevaError as error:
        print(f"deluceva: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deluceva: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
