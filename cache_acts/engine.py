"""The two-pass, resumable caching engine shared by `cache-acts run` and `cache-acts import`.

A source yields `RowBatch`es from a cursor; the engine scatters them to bucket files on a
writer thread (pass 1), then writes the shuffled rows as whole chunks (pass 2), committing its
`RunState` after every flush and every chunk. Killed at any moment and rerun with resume, it
truncates the bucket files to the last commit and produces the same bytes as an uninterrupted
run. The manifest says `complete: true` only after every chunk is written.
"""

from __future__ import annotations

import queue
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from cache_acts.rows import RowBatch, record_dtype, to_records
from cache_acts.shuffle import (
    BucketFiles,
    bucket_of,
    choose_n_buckets,
    iter_chunks,
    last_chunk_of_buckets,
)
from cache_acts.state import GATHER, SCATTER, TMP_DIR, RunState, tmp_dir
from cache_acts.writer import (
    ChunkSink,
    ChunkWriterPool,
    RawChunks,
    StatsSums,
    ZarrChunks,
    raw_chunks_or_none,
    write_chunk,
)
from shared.errors import fail
from shared.store import MANIFEST_KEY, Manifest, create_arrays, write_manifest

FLUSH_BYTES = 16 << 20  # most bytes pass 1 buffers before writing and committing

Source = Callable[[int], Iterator[RowBatch]]  # cursor -> batches from there on


@dataclass
class Job:
    """One caching job. `manifest` is the template (n_rows is set after pass 1)."""

    out: Path
    manifest: Manifest
    settings: dict[str, Any]  # what must match for --resume (options that change the output)
    row_bound: int  # an upper bound on the rows the source gives, to size the buckets
    max_rows: int | None  # cache exactly this many rows (None: all the source gives)
    shuffle_memory: int  # bytes; see cache_acts.shuffle for the bound
    short_message: str = "the source gives only {n} rows but {want} were asked for"


def prepare_out(out: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with --out: 'new', 'resume' or 'complete' (nothing left to do)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; choose a folder path for the store")
    if overwrite:
        _remove_store(out)
        return "new"
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if not resume:
        fail(f"--out {out} already exists; pass --resume to continue an interrupted run "
             "or --overwrite to replace it")
    if _manifest_complete(out):
        return "complete"
    if RunState.load(tmp_dir(out)) is None:
        if {p.name for p in out.iterdir()} == {TMP_DIR}:  # killed before its first commit
            shutil.rmtree(tmp_dir(out))
            return "new"
        fail(f"nothing to resume in {out}: it holds no interrupted cache-acts run; "
             "use --overwrite to replace it")
    return "resume"


def _manifest_complete(out: Path) -> bool:
    if not (out / "zarr.json").exists():
        return False
    try:
        raw = zarr.open_group(str(out), mode="r", zarr_format=3).attrs.get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - a half-written zarr.json means "not complete"
        return False
    return bool(raw and raw.get("complete"))


def _remove_store(out: Path) -> None:
    """Delete `out` only if it is empty or looks like one of our stores (never a random folder)."""
    if not out.exists():
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not ({"zarr.json", TMP_DIR} & entries):
        fail(f"refusing to overwrite {out}: it is not an activation store; choose another --out")
    shutil.rmtree(out)


def run_job(job: Job, source: Source, resume: bool = False, overwrite: bool = False) -> Manifest:
    """Cache the source into job.out; returns the final manifest."""
    mode = prepare_out(job.out, resume, overwrite)
    tmp = tmp_dir(job.out)
    if mode == "complete":
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"{job.out} is already complete; nothing to do", file=sys.stderr)
        return Manifest.from_dict(dict(zarr.open_group(str(job.out), mode="r").attrs[MANIFEST_KEY]))
    m = job.manifest
    rec = record_dtype(m.hooks, m.d_in, m.dtype)
    if mode == "resume":
        state = RunState.load(tmp)
        assert state is not None
        _check_same_settings(state.settings, job.settings, job.out)
    else:
        k = choose_n_buckets(job.row_bound * rec.itemsize, job.shuffle_memory)
        tmp.mkdir(parents=True, exist_ok=True)
        state = RunState(settings=job.settings, n_buckets=k, bucket_bytes=[0] * k)
        state.save(tmp)
    # small, frequent flushes: a big one stalls the model while the queue is full
    flush_bytes = max(min(job.shuffle_memory // 4, FLUSH_BYTES), 1)
    files = BucketFiles(tmp, state.n_buckets, rec, buffer_bytes=flush_bytes)
    if state.phase == SCATTER:
        _scatter(job, source, state, files)
    return _gather(job, state, files)


def _check_same_settings(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diff = [f"{k} (was {old.get(k)!r}, now {new.get(k)!r})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        fail(f"--resume of {out} with different settings: {'; '.join(diff)}; rerun with the "
             "original options or use --overwrite")


class _Scatterer(threading.Thread):
    """Writer thread of pass 1: records -> buckets -> files, statistics, commits."""

    def __init__(self, job: Job, state: RunState, files: BucketFiles):
        super().__init__(daemon=True)
        self.job, self.state, self.files = job, state, files
        self.queue: queue.Queue[tuple[int, RowBatch] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        m = job.manifest
        self.stats = {h: StatsSums.from_dict(state.stats[h]) if h in state.stats
                      else StatsSums(m.d_in[h]) for h in m.hooks}

    def run(self) -> None:
        pending: RowBatch | None = None
        rows_after = self.state.rows_done
        while True:
            item = self.queue.get()
            if self.error is not None:  # keep draining so the producer never blocks
                if item is None:
                    return
                continue
            try:
                if item is None:
                    if pending is not None:
                        self._commit(pending.cursor, rows_after)
                    return
                start, batch = item
                rows = np.arange(start, start + len(batch), dtype=np.int64)
                buckets = bucket_of(rows, self.job.manifest.seed, self.state.n_buckets)
                self.files.append(to_records(batch, self.files.rec), buckets)
                for hook, x in batch.acts.items():
                    self.stats[hook].add(x, self.job.manifest.dtype)
                pending, rows_after = batch, start + len(batch)
                if self.files.should_flush():
                    self._commit(batch.cursor, rows_after)
                    pending = None
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
                if item is None:
                    return

    def _commit(self, cursor: int, rows_done: int) -> None:
        self.files.flush()
        s = self.state
        s.cursor, s.rows_done, s.bucket_bytes = cursor, rows_done, self.files.sizes()
        s.stats = {h: st.to_dict() for h, st in self.stats.items()}
        s.save(self.files.folder)


def _scatter(job: Job, source: Source, state: RunState, files: BucketFiles) -> None:
    """Pass 1: run the source from the committed cursor and scatter its rows."""
    files.truncate_to(state.bucket_bytes)
    writer = _Scatterer(job, state, files)
    writer.start()
    rows = state.rows_done
    total = job.max_rows or job.row_bound
    bar = tqdm(total=total, initial=rows, unit="tok", unit_scale=True, file=sys.stderr,
               desc="pass 1/2 model+scatter", disable=None, dynamic_ncols=True)
    try:
        if job.max_rows is None or rows < job.max_rows:
            for batch in source(state.cursor):
                if job.max_rows is not None:
                    batch = batch.head(job.max_rows - rows)
                writer.queue.put((rows, batch))
                rows += len(batch)
                bar.update(len(batch))
                if writer.error is not None or rows == job.max_rows:
                    break
    finally:
        writer.queue.put(None)
        writer.join()
        bar.close()
    if writer.error is not None:
        raise writer.error
    n = state.rows_done
    if job.max_rows is not None and n < job.max_rows:
        shutil.rmtree(files.folder, ignore_errors=True)
        if not any(job.out.iterdir()):
            job.out.rmdir()
        fail(job.short_message.format(n=n, want=job.max_rows))
    if n == 0:
        shutil.rmtree(job.out, ignore_errors=True)
        fail("the source gave no rows to cache; check the dataset and --drop-special")
    state.phase = GATHER
    state.chunks_done = 0
    state.save(files.folder)


def _chunk_sink(group: zarr.Group, out: Path, m: Manifest, scratch: Path) -> ChunkSink:
    """Raw chunk files for uncompressed local stores (same bytes, no zarr overhead), else zarr."""
    raw = raw_chunks_or_none(group, out, m.array_paths(), m.chunk_rows, scratch)
    return raw if raw is not None else ZarrChunks(group, m.chunk_rows)


def _gather(job: Job, state: RunState, files: BucketFiles) -> Manifest:
    """Pass 2: write the shuffled rows as whole chunks, then the final manifest."""
    m = job.manifest
    m.n_rows = state.rows_done
    m.complete = False
    group = zarr.open_group(str(job.out), mode="a", zarr_format=3)
    if state.chunks_done == 0:
        create_arrays(group, m)
    rec_size = files.rec.itemsize
    bucket_rows = [b // rec_size for b in state.bucket_bytes]
    assert sum(bucket_rows) == m.n_rows
    bar = tqdm(total=m.n_chunks, initial=state.chunks_done, unit="chunk", file=sys.stderr,
               desc="pass 2/2 shuffle+write", disable=None, dynamic_ncols=True)
    sink = _chunk_sink(group, job.out, m, files.folder)

    last_chunk = last_chunk_of_buckets(bucket_rows, m.chunk_rows)

    def commit(index: int, sums: dict[str, int]) -> None:  # chunks 0..index are on disk
        for path, crc in sums.items():
            recorded = state.checksums.setdefault(path, [])
            del recorded[index:]
            recorded.append(crc)
        state.chunks_done = index + 1
        state.save(files.folder)
        # A bucket whose rows are all in committed chunks is never read again, even on resume:
        # deleting it at once bounds the temporary disk space and gives its page-cache pages
        # back for the chunks still to write (far cheaper than fresh ones on a VM).
        for b, last in enumerate(last_chunk):
            if last == index:
                files.remove(b)
        bar.update(1)

    # two writers for raw chunk files (page-cache copies scale with cores, and the model is
    # idle in pass 2); one through the zarr API, whose codecs have their own threads
    writer = ChunkWriterPool(lambda index, records: write_chunk(sink, index, records), commit,
                             workers=2 if isinstance(sink, RawChunks) else 1)
    try:
        for index, records in iter_chunks(files, bucket_rows, m.seed, m.chunk_rows,
                                          start_chunk=state.chunks_done):
            writer.submit(index, records)
    finally:
        writer.finish()
    bar.close()
    m.stats = {h: StatsSums.from_dict(state.stats[h]).result() for h in m.hooks}
    m.checksums = {p: state.checksums[p] for p in m.array_paths()}
    m.complete = True
    write_manifest(group, m)  # the last step: from here on the store reads as complete
    shutil.rmtree(files.folder, ignore_errors=True)
    return m
