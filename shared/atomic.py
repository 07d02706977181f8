"""Replace a file atomically: a reader (or a run killed midway) sees the old file or the whole
new one, never a torn write."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from shared.errors import fail


def temporary_sibling(path: Path) -> Path:
    """Where `atomic_write` writes before renaming (same folder, so the rename is atomic)."""
    return path.with_name(path.name + ".tmp")


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """Write `path` through `write(temporary path)`, then rename it into place. `durable` also
    fsyncs the new bytes first, so they survive a power cut, not only a killed process."""
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C...: leave no torn .tmp behind, the old file stays
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_folder_files(folder: Path, files: dict[str, Callable[[Path], object]],
                       last: str) -> None:
    """Write `files` (name -> writer of that path) into `folder` as one unit: a new folder is
    written under a temporary name `.<folder>.<random>` and renamed into place; in an existing
    folder (which may hold other files) `last` is removed first and moved in last, so a folder
    holding `last` always holds the complete set."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if folder.exists():
            (folder / last).unlink(missing_ok=True)  # the old one must not vouch for new files
            for name in sorted(files, key=lambda n: n == last):
                os.replace(tmp / name, folder / name)
            tmp.rmdir()
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# The writers of torch and safetensors report a failed write (a full disk) as their own errors
# (RuntimeError "unexpected pos", SafetensorError), which would reach the user as a traceback;
# these keep it the OSError it is, so the CLIs say "the disk is full" in one line.
def write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """safetensors.torch.save_file, with a failed write raised as OSError (the file's bytes are
    built in memory first: a dictionary's size, far below a checkpoint's)."""
    from safetensors.torch import save

    path.write_bytes(save(tensors))


def write_torch(path: Path, obj: Any) -> None:
    """torch.save, streamed to the file, with a failed write raised as OSError."""
    import torch

    with open(path, "wb") as f:
        sink = _WriteErrors(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


class _WriteErrors:
    """A binary file that remembers the OSError of a failed write."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def check_out(path: Path, option: str = "--out") -> None:
    """Refuse (UserError) an output folder that cannot be created or written: a part of it that
    is a file, or a nearest existing folder without write permission."""
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        fail(f"{option} {path}: {existing} is a file, not a folder; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{option} {path}: folder {existing} is not writable; choose another {option} or "
             "fix its permissions")
