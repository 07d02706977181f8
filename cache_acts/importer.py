"""`cache-acts import`: a store from activations the user already has (.npy / .safetensors).

The files are read in slices (memory-mapped .npy, sliced safetensors) and go through the same
two-pass shuffle as `cache-acts run`. There are no tokens: `token_ids` is -1, `seq_index` is the
file's index in `manifest.source_files` and `position` is the row inside that file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_acts.engine import Job, run_job, work_dir
from cache_acts.model_list import check_hook_name
from cache_acts.rows import RowBatch
from shared.distributed import LOCAL, World
from shared.errors import check_seed, fail
from shared.fingerprint import files_fingerprint
from shared.storage import Location, as_location
from shared.store import Manifest, check_dtype, resolve_shard_rows, to_storage
from shared.units import MiB

READ_BYTES = 32 * MiB  # rows read per step


@dataclass
class ImportConfig:
    files: list[Path]
    hook: str
    out: Location  # a local folder or any fsspec URL (a Path is taken as a local folder)
    key: str | None = None  # tensor name inside .safetensors files holding several
    dtype: str = "float32"
    compression: str | None = None
    seed: int = 0
    chunk_rows: int = 4096
    shard_rows: int | None = None  # None: shared.store.default_shard_rows
    shuffle_memory: int = 512 * MiB
    model: str = "imported"  # recorded in the manifest: the model the activations came from
    tmp_dir: str | None = None  # local folder for the work files of a remote --out

    def __post_init__(self) -> None:
        self.out = as_location(self.out)
        check_dtype(self.dtype)
        if not self.files:
            fail("no input files; pass one or more .npy or .safetensors files")
        check_hook_name(self.hook)
        if "/" in self.hook:  # tags (TAG/HOOK) name models of `cache-acts run`
            fail(f"--hook {self.hook!r} must be a name without '/'")
        if self.chunk_rows < 1:
            fail(f"--chunk-rows must be at least 1, got {self.chunk_rows}")
        check_seed(self.seed)


class _Source:
    """One input file as a 2-D array readable in row slices."""

    def __init__(self, path: Path, key: str | None):
        self.path = path
        if not path.is_file():
            fail(f"cannot read {path}: no such file; check the path")
        if path.suffix == ".npy":
            try:
                self._array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                fail(f"cannot read {path} as a .npy array ({e}); check the file")
            self.shape, dtype = tuple(self._array.shape), self._array.dtype
            floating = np.issubdtype(dtype, np.floating)
        elif path.suffix == ".safetensors":
            self._open_safetensors(key)
            floating = self._slice.get_dtype() in ("F64", "F32", "F16", "BF16")
            dtype = self._slice.get_dtype()
        else:
            fail(f"cannot import {path}: use .npy or .safetensors files")
        if len(self.shape) != 2:
            fail(f"{path} has shape {self.shape}; activations must be 2-D (rows, d_in)")
        if not floating:
            fail(f"{path} holds {dtype} values; activations must be floating point")

    def _open_safetensors(self, key: str | None) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(self.path), framework="pt")
            keys = list(f.keys())
        except (OSError, SafetensorError) as e:
            fail(f"cannot read {self.path} as safetensors ({e}); check the file")
        if key is None:
            if len(keys) != 1:
                fail(f"{self.path} holds {len(keys)} tensors ({', '.join(keys[:8])}); "
                     "choose one with --key")
            key = keys[0]
        elif key not in keys:
            fail(f"{self.path} has no tensor {key!r}; it holds {', '.join(keys[:8])}")
        self._file = f
        self._slice = f.get_slice(key)
        self.shape = tuple(self._slice.get_shape())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.path.suffix == ".npy":
            return torch.from_numpy(np.array(self._array[start:stop]))
        return self._slice[start:stop]


def import_files(cfg: ImportConfig, resume: bool = False, overwrite: bool = False,
                 world: World = LOCAL) -> Manifest:
    """Build a shuffled store from cfg.files (see module docstring for the metadata arrays)."""
    sources = [_Source(Path(p), cfg.key) for p in cfg.files]
    d_in = sources[0].shape[1]
    for s in sources[1:]:
        if s.shape[1] != d_in:
            fail(f"{s.path} has d_in {s.shape[1]} but {sources[0].path} has {d_in}; "
                 "import files of one hook with the same width")
    n_rows = sum(s.shape[0] for s in sources)
    if n_rows == 0:
        fail("the input files hold no rows")
    offsets = np.cumsum([0] + [s.shape[0] for s in sources])
    step = max(READ_BYTES // (4 * d_in), 1)

    def batches(cursor: int, mine: Callable[[int], bool]) -> Iterator[RowBatch | None]:
        """cursor = rows consumed across the files in order; batches that are not mine (another
        rank's) are None and not read."""
        for k in itertools.count():
            if cursor >= n_rows:
                return
            f = int(np.searchsorted(offsets, cursor, side="right")) - 1
            start = cursor - int(offsets[f])
            stop = min(start + step, sources[f].shape[0])
            n = stop - start
            cursor += n
            if not mine(k):
                yield None
                continue
            x = sources[f].rows(start, stop)  # [n, d_in]
            yield RowBatch(
                acts={cfg.hook: to_storage(x, cfg.dtype)},
                token_ids=np.full(n, -1, dtype=np.int32),
                seq_index=np.full(n, f, dtype=np.int64),
                position=np.arange(start, stop, dtype=np.int32),
                cursor=cursor,
            )

    # no model to fingerprint: the activations are all there is
    fingerprints = {"model": None, "dataset": files_fingerprint(
        [s.path for s in sources], "activation files", key=cfg.key)}
    shard_rows = resolve_shard_rows(cfg.shard_rows, cfg.chunk_rows, {cfg.hook: d_in}, cfg.dtype,
                                    n_rows)
    manifest = Manifest(
        model=cfg.model, hooks=[cfg.hook], d_in={cfg.hook: d_in}, dtype=cfg.dtype, n_rows=0,
        context_size=0, seed=cfg.seed, chunk_rows=cfg.chunk_rows, shard_rows=shard_rows,
        compression=cfg.compression,
        source_files=[str(s.path.resolve()) for s in sources], fingerprints=fingerprints,
    )
    # the files are known by their content (in order), so moved copies resume
    settings = {"dataset_fingerprint": fingerprints["dataset"], "key": cfg.key, "hook": cfg.hook,
                "dtype": cfg.dtype, "compression": cfg.compression, "seed": cfg.seed,
                "chunk_rows": cfg.chunk_rows, "shard_rows": shard_rows}
    job = Job(out=cfg.out, work=work_dir(cfg.out, cfg.tmp_dir), manifest=manifest,
              settings=settings, row_bound=n_rows, max_rows=n_rows,
              shuffle_memory=cfg.shuffle_memory,
              nonfinite_hint="the input files hold them; remove or fix those rows and import "
                             "again")
    return run_job(job, batches, resume=resume, overwrite=overwrite, world=world)
