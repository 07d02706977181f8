"""The resume state of a run: a small JSON file replaced atomically at every commit.

Everything a restarted run needs to continue exactly where the last commit left off lives here:
where the source stopped, how many bytes each bucket file had, the running statistics, and in
pass 2 how many output chunks are written and their checksums.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write_text
from shared.store import WORK_DIR as TMP_DIR  # the store layer must recognise a half-made store

STATE_FILE = "state.json"

SCATTER, GATHER = "scatter", "gather"


@dataclass
class RunState:
    settings: dict[str, Any]  # everything that decides the output; must match on --resume
    n_buckets: int
    phase: str = SCATTER
    cursor: int = 0  # source position after the last committed batch
    rows_done: int = 0  # rows scattered so far (pass 1) = n_rows once pass 1 ends
    bucket_bytes: list[int] = field(default_factory=list)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # hook -> StatsSums.to_dict()
    chunks_done: int = 0
    checksums: dict[str, list[int]] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        """Replace the state file atomically: a reader sees the old or the new state."""
        atomic_write_text(folder / STATE_FILE, json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> RunState | None:
        p = folder / STATE_FILE
        if not p.exists():
            return None
        return cls(**json.loads(p.read_text()))


def tmp_dir(out: Path) -> Path:
    return out / TMP_DIR
