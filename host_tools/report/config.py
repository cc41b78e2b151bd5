"""What ``edgectl config show`` and ``edgectl init`` print: each setting, its value and where it came from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host_tools.report.table import Column, render_table

if TYPE_CHECKING:
    from host_tools.config import Resolved

__all__ = ["init_data", "init_text", "settings_data", "settings_text"]


def settings_data(settings: Mapping[str, Resolved], config_path: Path | None, exists: bool) -> dict[str, Any]:
    """``config show --json``: the config file looked at, and every setting with its source (secrets masked)."""
    return {
        "config_file": str(config_path) if config_path is not None else None,
        "config_file_exists": exists,
        "settings": [r.to_dict() for r in settings.values()],
    }


def settings_text(settings: Mapping[str, Resolved], config_path: Path | None, exists: bool) -> str:
    """A table of setting, value and source, under a line naming the config file."""
    state = "" if exists else " (does not exist; `edgectl init` writes it)"
    columns = [
        Column("setting", lambda r: r.name),
        Column("value", lambda r: r.shown()),
        Column("source", lambda r: r.source),
    ]
    return f"config file: {config_path}{state}\n" + render_table(columns, list(settings.values()))


def init_data(path: Path, written: Sequence[Resolved], replaced: bool) -> dict[str, Any]:
    """``init --json``: the file written, whether it replaced one, and the settings written as values."""
    return {"path": str(path), "replaced": replaced, "written": [r.to_dict() for r in written]}


def init_text(path: Path, written: Sequence[Resolved], replaced: bool) -> str:
    """One line naming the file, then the settings written as values (the rest are commented defaults)."""
    verb = "replaced" if replaced else "wrote"
    lines = [f"{verb} {path}; `edgectl config show` prints what is in effect"]
    lines += [f"  {r.name} = {r.shown()} (from {r.source})" for r in written]
    return "\n".join(lines)
