"""Atomic sweep checkpoints: one file with every member's state, written to a temp file + os.replace.

A checkpoint holds, for step `step` (the index of the next batch to train on): each member's SAE
state_dict (parameters and buffers such as AuxK's tokens-since-fired), Adam state, density counters,
status, resampling RNG, log-file offsets; the global torch RNG state; the W&B run id. The loader
position is `step` itself, since batch i is a pure function of i.

Under torchrun rank 0 gathers every rank's member states at the same step and writes this one
file, so a checkpoint does not depend on how many ranks wrote it: any number of ranks (or one
process) resumes it, and every rank reads the states of its own members from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write, temporary_sibling, write_torch
from shared.errors import fail, first_line

CHECKPOINT_NAME = "checkpoint.pt"
# what every checkpoint written since stores were fingerprinted holds
REQUIRED_KEYS = frozenset({"step", "torch_rng", "members", "store_fingerprint"})


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    path = folder / CHECKPOINT_NAME
    atomic_write(path, lambda tmp: write_torch(tmp, state), durable=True)
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The checkpoint in `folder`, or None if there is none."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:  # memory-mapped (copy on write): each rank of a sweep pages in only its members' states
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to remove
        fail(f"checkpoint {path} cannot be read ({first_line(e)}); restore it, or start again "
             "with --overwrite")
    missing = REQUIRED_KEYS - set(state) if isinstance(state, dict) else REQUIRED_KEYS
    if missing:
        fail(f"{path} is not a train-sae sweep checkpoint (it lacks {', '.join(sorted(missing))}); "
             "restore the sweep's own checkpoint, or start again with --overwrite")
    return state


def remove_checkpoint(folder: Path) -> None:
    path = folder / CHECKPOINT_NAME
    for p in (path, temporary_sibling(path)):
        p.unlink(missing_ok=True)
