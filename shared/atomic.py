"""Replace a file atomically: a reader (or a run killed midway) sees the old file or the whole
new one, never a torn write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """Where `atomic_write` writes before renaming (same folder, so the rename is atomic)."""
    return path.with_name(path.name + ".tmp")


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """Write `path` through `write(temporary path)`, then rename it into place. `durable` also
    fsyncs the new bytes first, so they survive a power cut, not only a killed process."""
    tmp = temporary_sibling(path)
    write(tmp)
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
