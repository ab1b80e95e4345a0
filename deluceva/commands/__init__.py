"""One module per CLI subcommand; each has `add_parser(commands, **types)` that sets `handler`."""

from __future__ import annotations

import importlib

__all__ = ["register_all", "COMMANDS"]

# Listed explicitly, in the order `deluceva --help` shows them.
COMMANDS = ["demo", "run", "streams", "bench", "bench-streams", "profile", "compile", "explain"]


def register_all(commands, **types) -> None:
    for name in COMMANDS:
        importlib.import_module(f"deluceva.commands.{name.replace('-', '_')}").add_parser(commands, **types)
