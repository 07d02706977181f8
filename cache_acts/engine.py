"""The two-pass, resumable caching engine shared by `cache-acts run` and `cache-acts import`.

A source yields `RowBatch`es from a cursor; the engine scatters them to bucket files on a
writer thread (pass 1), then writes the shuffled rows as whole chunks into shard objects (pass 2),
committing its `RunState` after every flush and every sealed shard. Killed at any moment and
rerun with resume, it truncates the bucket files to the last commit, rewrites any unsealed shard
and produces the same bytes as an uninterrupted run. The manifest says `complete: true` only
after every shard is written.
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
    ChunkWriterPool,
    RawShards,
    ShardSink,
    StatsSums,
    ZarrShards,
    raw_shards_or_none,
    write_chunk,
)
from shared.errors import fail
from shared.fingerprint import digests, short
from shared.lock import LOCK_FILE, exclusive
from shared.store import (
    ACTS_GROUP,
    MANIFEST_KEY,
    META_ARRAYS,
    Manifest,
    create_arrays,
    write_manifest,
)

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
    nonfinite_hint: str = "the source produced them; fix the source and run again"


def prepare_out(out: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with --out: 'new', 'resume' or 'complete' (nothing left to do)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; choose a folder path for the store")
    if overwrite:
        remove_store(out)
        return "new"
    if not out.exists() or not _entries(out):
        return "new"
    if not resume:
        fail(f"--out {out} already exists; pass --resume to continue an interrupted run "
             "or --overwrite to replace it")
    if _read_manifest(out).get("complete"):
        return "complete"
    if RunState.load(tmp_dir(out)) is None:
        if _entries(out) == {TMP_DIR}:  # killed before its first commit
            shutil.rmtree(tmp_dir(out))
            return "new"
        fail(f"nothing to resume in {out}: it holds no interrupted cache-acts run; "
             "use --overwrite to replace it")
    return "resume"


def _entries(out: Path) -> set[str]:
    """The names in --out, leaving out the lock of the run that holds it."""
    return {p.name for p in out.iterdir()} - {LOCK_FILE}


def _read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the store at `out` as written so far ({} when there is none)."""
    if not (out / "zarr.json").exists():
        return {}
    try:
        raw = zarr.open_group(str(out), mode="r", zarr_format=3).attrs.get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - a half-written zarr.json holds no manifest
        return {}
    return dict(raw) if isinstance(raw, dict) else {}


def remove_store(out: Path) -> None:
    """Delete the store at `out` for --overwrite: only a store this project wrote (its manifest,
    or the resume state of an interrupted run, says so), and only its own files; anything else
    in the folder stays and is named in the refusal."""
    if not out.exists():
        return
    entries = _entries(out)
    manifest = _read_manifest(out)
    state = RunState.load(tmp_dir(out))
    ours = {TMP_DIR} & entries if state is not None else set()
    if manifest or state is not None:  # (a run may stop before the group has its first manifest)
        ours |= {"zarr.json", ACTS_GROUP, *META_ARRAYS} & entries
    elif "zarr.json" in entries:
        fail(f"refusing to overwrite {out}: it is a Zarr store that cache-acts did not write "
             "(no manifest); choose another --out")
    if manifest:
        hooks = manifest.get("hooks", [])
    elif state is not None:  # `run` settings list their hooks, `import` settings name one
        hooks = state.settings.get("hooks") or [state.settings.get("hook")]
    else:
        hooks = []
    foreign = entries - ours
    if foreign or not _acts_are_ours(out, hooks):
        names = sorted(foreign) or [ACTS_GROUP + "/ (arrays not in the manifest)"]
        fail(f"refusing to overwrite {out}: it holds files cache-acts did not write "
             f"({', '.join(names[:5])}); move them away or choose another --out")
    for name in ours:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def _acts_are_ours(out: Path, hooks: list[Any]) -> bool:
    """acts/ holds only our hook arrays (hook names may nest: `tag/hook`)."""
    acts = out / ACTS_GROUP
    if not acts.is_dir():
        return True
    allowed = {"zarr.json"} | {str(h).split("/")[0] for h in hooks}
    return {p.name for p in acts.iterdir()} <= allowed


def run_job(job: Job, source: Source, resume: bool = False, overwrite: bool = False) -> Manifest:
    """Cache the source into job.out, holding the folder's lock; returns the final manifest."""
    with exclusive(job.out, "cache-acts"):  # a run failing before it writes leaves no folder
        return _run_locked(job, source, resume, overwrite)


def _run_locked(job: Job, source: Source, resume: bool, overwrite: bool) -> Manifest:
    mode = prepare_out(job.out, resume, overwrite)
    tmp = tmp_dir(job.out)
    if mode == "complete":
        return _already_complete(job)
    m = job.manifest
    m.settings = job.settings
    rec = record_dtype(m.hooks, m.d_in, m.dtype)
    if mode == "resume":
        state = RunState.load(tmp)
        assert state is not None
        check_same_settings(state.settings, job.settings, job.out)
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


def _already_complete(job: Job) -> Manifest:
    """--resume of a finished store: nothing to do, if it was made from the same inputs."""
    raw = _read_manifest(job.out)
    if not raw.get("settings"):
        fail(f"{job.out} is a complete store that records no settings (written by an older "
             "version), so it cannot be told whether it matches these options; drop --resume to "
             "use it as it is, or use --overwrite to cache it again")
    check_same_settings(raw["settings"], job.settings, job.out)
    shutil.rmtree(tmp_dir(job.out), ignore_errors=True)
    print(f"{job.out} is already complete; nothing to do", file=sys.stderr)
    return Manifest.from_dict(raw)


def check_same_settings(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse a --resume whose options or inputs (by content) differ from the first run's."""
    changed = [k for k in sorted(set(old) | set(new)) if digests(old.get(k)) != digests(new.get(k))]
    if changed:
        parts = [_change(k, old.get(k), new.get(k)) for k in changed]
        fail(f"--resume of {out} with different inputs: {'; '.join(parts)}; rerun with the "
             "original options and data, or use --overwrite to start again")


def _change(key: str, old: Any, new: Any) -> str:
    if key.endswith("fingerprint"):
        what = key.removesuffix("_fingerprint").replace("_", " ")
        return (f"the {what} changed content since the run started (fingerprint "
                f"{short(old)} -> {short(new)})")
    return f"{key} (was {old!r}, now {new!r})"


def _nonfinite_message(job: Job, hook: str, bad: int, size: int, start: int, n: int) -> str:
    """Non-finite values are refused, never stored: a store holding them would be blamed on the
    learning rate of every SAE trained on it."""
    where = f"{bad:,} of the {size:,} values of hook {hook!r} in rows {start:,}-{start + n - 1:,}"
    if job.manifest.dtype == "float16":
        return (f"{where} are not finite as float16, whose largest value is 65504; cache with "
                "--dtype bfloat16 or float32 (and if the source itself holds NaN/inf, fix it)")
    return f"{where} are NaN or inf; {job.nonfinite_hint}"


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
                for hook, x in batch.acts.items():  # before any row of the batch is kept
                    bad = self.stats[hook].add(x, self.job.manifest.dtype)
                    if bad:
                        fail(_nonfinite_message(self.job, hook, bad, x.size, start, len(batch)))
                rows = np.arange(start, start + len(batch), dtype=np.int64)
                buckets = bucket_of(rows, self.job.manifest.seed, self.state.n_buckets)
                self.files.append(to_records(batch, self.files.rec), buckets)
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
        shutil.rmtree(files.folder, ignore_errors=True)  # run_job removes a folder it made
        fail(job.short_message.format(n=n, want=job.max_rows))
    if n == 0:
        shutil.rmtree(files.folder, ignore_errors=True)
        fail("the source gave no rows to cache; check the dataset and --drop-special")
    state.phase = GATHER
    state.chunks_done = 0
    state.save(files.folder)


def _shard_sink(group: zarr.Group, out: Path, m: Manifest, scratch: Path) -> ShardSink:
    """Raw shard files for uncompressed local stores (same bytes, no zarr overhead), else zarr."""
    raw = raw_shards_or_none(group, out, m, scratch)
    return raw if raw is not None else ZarrShards(group, m.chunk_rows, m.shard_rows, m.n_rows)


def _gather(job: Job, state: RunState, files: BucketFiles) -> Manifest:
    """Pass 2: write the shuffled rows as whole chunks gathered into shards, committing after
    each shard, then the final manifest."""
    m = job.manifest
    assert m.shard_rows is not None, "stores are written sharded (format 2)"
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
    sink = _shard_sink(group, job.out, m, files.folder)
    per_shard = m.chunks_per_shard

    last_chunk = last_chunk_of_buckets(bucket_rows, m.chunk_rows)
    files.check(state.bucket_bytes, needed=[last >= state.chunks_done for last in last_chunk])

    def commit(index: int, sums: dict[str, int]) -> None:  # chunks 0..index are put
        for path, crc in sums.items():
            recorded = state.checksums.setdefault(path, [])
            del recorded[index:]
            recorded.append(crc)
        bar.update(1)
        if (index + 1) % per_shard and index + 1 < m.n_chunks:
            return  # its shard is not whole yet: nothing is durable until it is sealed
        sink.seal(index // per_shard)
        before, state.chunks_done = state.chunks_done, index + 1
        state.save(files.folder)
        # A bucket whose rows are all in committed shards is never read again, even on resume:
        # deleting it at once bounds the temporary disk space and gives its page-cache pages
        # back for the shards still to write (far cheaper than fresh ones on a VM).
        for b, last in enumerate(last_chunk):
            if before <= last <= index:
                files.remove(b)

    # two writers for raw shard files (page-cache copies scale with cores, and the model is
    # idle in pass 2); one through the zarr API, whose codecs have their own threads
    writer = ChunkWriterPool(lambda index, records: write_chunk(sink, index, records), commit,
                             workers=2 if isinstance(sink, RawShards) else 1)
    try:
        for index, records in iter_chunks(files, bucket_rows, m.seed, m.chunk_rows,
                                          start_chunk=state.chunks_done):
            writer.submit(index, records)
    finally:
        writer.finish()
    bar.close()
    m.stats = {h: StatsSums.from_dict(state.stats[h]).result() for h in m.hooks}
    m.checksums = {p: state.checksums[p][:m.n_chunks] for p in m.array_paths()}
    m.complete = True
    write_manifest(group, m)  # the last step: from here on the store reads as complete
    shutil.rmtree(files.folder, ignore_errors=True)
    return m
