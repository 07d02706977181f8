"""`cache-acts import`: a store from activations the user already has (.npy / .safetensors).

The files are read in slices (memory-mapped .npy, sliced safetensors) and go through the same
two-pass shuffle as `cache-acts run`. Several hooks (`--hook NAME=FILE[,FILE...]`, repeated) are
aligned by row: row i of every hook's files, taken in order, is the same token, so a transcoder
can read one hook and predict another. There are no tokens: `token_ids` is -1, `seq_index` is
the file's index in `manifest.source_files` (the first hook's files) and `position` is the row
inside that file.
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
    # hook name -> its files, in order; every hook's files hold the same rows (row i of each
    # hook's concatenation is the same token), possibly split into files differently
    hooks: dict[str, list[Path]]
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
        if not self.hooks:
            fail("no hook to import; pass --hook NAME with files, or --hook NAME=FILE[,FILE...]")
        for hook, files in self.hooks.items():
            check_hook_name(hook)
            if "/" in hook:  # tags (TAG/HOOK) name models of `cache-acts run`
                fail(f"--hook {hook!r} must be a name without '/'")
            if not files:
                fail(f"no input files for hook {hook!r}; pass one or more .npy or .safetensors "
                     "files")
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


def _hook_sources(hook: str, files: list[Path], key: str | None) -> list[_Source]:
    """One hook's files, all of one width."""
    sources = [_Source(Path(p), key) for p in files]
    for s in sources[1:]:
        if s.shape[1] != sources[0].shape[1]:
            fail(f"{s.path} has d_in {s.shape[1]} but {sources[0].path} has "
                 f"{sources[0].shape[1]}; the files of hook {hook!r} must have one width")
    return sources


def import_files(cfg: ImportConfig, resume: bool = False, overwrite: bool = False,
                 world: World = LOCAL) -> Manifest:
    """Build a shuffled store from cfg.hooks' files (see the module docstring for the metadata
    arrays, which follow the first hook's files)."""
    sources = {h: _hook_sources(h, files, cfg.key) for h, files in cfg.hooks.items()}
    d_in = {h: srcs[0].shape[1] for h, srcs in sources.items()}
    offsets = {h: np.cumsum([0] + [s.shape[0] for s in srcs]) for h, srcs in sources.items()}
    first = next(iter(sources))
    n_rows = int(offsets[first][-1])
    for h in sources:
        if int(offsets[h][-1]) != n_rows:
            fail(f"hook {h!r} has {int(offsets[h][-1]):,} rows but {first!r} has {n_rows:,}; "
                 "aligned hooks hold the same rows (row i of each is the same token)")
    if n_rows == 0:
        fail("the input files hold no rows")
    # a batch never crosses a file boundary of any hook, and holds about READ_BYTES
    bounds = np.unique(np.concatenate(list(offsets.values())))
    step = max(READ_BYTES // (4 * sum(d_in.values())), 1)

    def rows_of(hook: str, lo: int, hi: int) -> torch.Tensor:
        f = int(np.searchsorted(offsets[hook], lo, side="right")) - 1
        base = int(offsets[hook][f])
        return sources[hook][f].rows(lo - base, hi - base)  # [hi - lo, d_in]

    def batches(cursor: int, mine: Callable[[int], bool]) -> Iterator[RowBatch | None]:
        """cursor = rows consumed across the files in order; batches that are not mine (another
        rank's) are None and not read."""
        for k in itertools.count():
            if cursor >= n_rows:
                return
            lo = cursor
            cursor = min(lo + step, int(bounds[np.searchsorted(bounds, lo, side="right")]))
            if not mine(k):
                yield None
                continue
            f = int(np.searchsorted(offsets[first], lo, side="right")) - 1
            start = lo - int(offsets[first][f])
            yield RowBatch(
                acts={h: to_storage(rows_of(h, lo, cursor), cfg.dtype) for h in sources},
                token_ids=np.full(cursor - lo, -1, dtype=np.int32),
                seq_index=np.full(cursor - lo, f, dtype=np.int64),
                position=np.arange(start, start + cursor - lo, dtype=np.int32),
                cursor=cursor,
            )

    # no model to fingerprint: the activations are all there is; the files are known by their
    # content (in order), so moved copies resume
    every_file = [s.path for srcs in sources.values() for s in srcs]
    facts = {"key": cfg.key} if len(sources) == 1 else {
        "key": cfg.key, "hooks": {h: len(srcs) for h, srcs in sources.items()}}
    fingerprints = {"model": None,
                    "dataset": files_fingerprint(every_file, "activation files", **facts)}
    shard_rows = resolve_shard_rows(cfg.shard_rows, cfg.chunk_rows, d_in, cfg.dtype, n_rows)
    manifest = Manifest(
        model=cfg.model, hooks=list(sources), d_in=d_in, dtype=cfg.dtype, n_rows=0,
        context_size=0, seed=cfg.seed, chunk_rows=cfg.chunk_rows, shard_rows=shard_rows,
        compression=cfg.compression,
        source_files=[str(s.path.resolve()) for s in sources[first]], fingerprints=fingerprints,
    )
    settings = {"dataset_fingerprint": fingerprints["dataset"], "key": cfg.key,
                "hooks": list(sources), "dtype": cfg.dtype, "compression": cfg.compression,
                "seed": cfg.seed, "chunk_rows": cfg.chunk_rows, "shard_rows": shard_rows}
    job = Job(out=cfg.out, work=work_dir(cfg.out, cfg.tmp_dir), manifest=manifest,
              settings=settings, row_bound=n_rows, max_rows=n_rows,
              shuffle_memory=cfg.shuffle_memory,
              nonfinite_hint="the input files hold them; remove or fix those rows and import "
                             "again")
    return run_job(job, batches, resume=resume, overwrite=overwrite, world=world)
