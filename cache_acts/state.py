"""The resume state of a run: a small JSON file replaced atomically at every commit.

Everything a restarted run needs to continue exactly where the last commit left off lives here:
where the source stopped, how many bytes each rank's bucket files had, the running statistics,
and in pass 2 how far each rank got in its range of output chunks and their checksums. Rank 0
writes it after every meeting of the ranks (cache_acts.engine), so it describes all of them.
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
    world_size: int = 1  # the ranks that run it; a --resume needs as many
    run_id: str = ""  # random, so ranks on several nodes can tell they see the same work folder
    phase: str = SCATTER
    cursor: int = 0  # source position after the last committed batch
    rows_done: int = 0  # rows scattered so far (pass 1) = n_rows once pass 1 ends
    bucket_bytes: list[list[int]] = field(default_factory=list)  # [rank][bucket] bytes
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # hook -> StatsSums.to_dict()
    # pass 2: the next chunk each rank writes (its range starts at `chunk_ranges`) ...
    chunks_done: list[int] = field(default_factory=list)
    # ... and the CRC32 of every chunk written so far (None: not yet), per array path
    checksums: dict[str, list[int | None]] = field(default_factory=dict)

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
