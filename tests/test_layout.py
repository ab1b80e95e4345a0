"""The package's layers, as the README's "How it works" lists them: each imports only those
listed before it (a newcomer reads them bottom up; a loop between folders would make that a lie)."""

from __future__ import annotations

import re
from pathlib import Path

import deluceva

LAYERS = [
    {"errors", "files", "machine", "memory", "onnxruntime_session"},
    {"operators"},
    {"planner"},
    {"runtime"},
    {"profiles"},
    {"session"},
    {"media", "presets", "metrics"},
    {"controller"},
    {"playback"},
    {"streams"},
    {"bench"},
    {"commands", "cli", "demo"},
]
# Within one row, these may import each other in this direction only.
WITHIN = {("files", "errors"), ("machine", "errors"),
          ("presets", "media"), ("metrics", "presets"), ("presets", "errors"), ("media", "errors"),
          ("commands", "demo"), ("cli", "commands")}


def _unit(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").parts[0]


def test_each_layer_imports_only_the_layers_before_it():
    root = Path(deluceva.__file__).parent
    level = {unit: i for i, row in enumerate(LAYERS) for unit in row}
    wrong = []
    for path in root.rglob("*.py"):
        unit = _unit(path, root)
        if unit == "__init__":
            continue
        assert unit in level, f"{unit} is not in the README's layer table"
        for found in re.finditer(r"^\s*(?:from|import) deluceva\.(\w+)", path.read_text(), re.MULTILINE):
            other = found.group(1)
            if other == unit:
                continue
            if level[other] > level[unit] or (level[other] == level[unit] and (unit, other) not in WITHIN):
                wrong.append(f"{path.relative_to(root)} imports deluceva.{other}")
    assert not wrong, "\n".join(wrong)
