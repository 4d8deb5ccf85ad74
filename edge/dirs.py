"""The user's directories (XDG): cache (derived models), config (device profiles), data (saved chats); what a
path holds on disk (`bytes_under`)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or os.path.join(os.path.expanduser("~"), fallback)) / "edge"


def cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache")


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config")


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", os.path.join(".local", "share"))


def bytes_under(path: Path) -> int:
    """A file's size, or a directory's files' (a store)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
