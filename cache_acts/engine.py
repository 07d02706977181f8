"""The two-pass, resumable caching engine shared by `cache-acts run` and `cache-acts import`.

A source yields `RowBatch`es from a cursor; the engine scatters them to bucket files on a
writer thread (pass 1), then writes the shuffled rows as whole chunks into shard objects (pass 2),
committing its `RunState` after every flush and every sealed shard. Killed at any moment and
rerun with resume, it truncates the bucket files to the last commit, rewrites any unsealed shard
and produces the same bytes as an uninterrupted run. The manifest says `complete: true` only
after every shard is written.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import shutil
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from cache_acts.state import GATHER, SCATTER, TMP_DIR, RunState
from cache_acts.state import tmp_dir as tmp_dir_of
from cache_acts.writer import (
    BatchSums,
    ChunkWriterPool,
    RawShards,
    SequenceFile,
    ShardSink,
    StatsSums,
    ZarrShards,
    batch_sums,
    raw_shards_or_none,
    write_chunk,
)
from shared.distributed import LOCAL, World
from shared.errors import fail
from shared.fingerprint import digests, short
from shared.lock import LOCK_FILE, exclusive
from shared.storage import Location, scratch_dir
from shared.store import (
    ACTS_GROUP,
    MANIFEST_KEY,
    META_ARRAYS,
    SEQUENCES,
    Manifest,
    count_nonfinite,
    create_arrays,
    write_manifest,
    write_sequences,
)

FLUSH_BYTES = 16 << 20  # most bytes pass 1 buffers before writing and committing

# (cursor, mine) -> one item per batch of the source from the cursor on: the RowBatch for batch k
# when mine(k) (run the model on it), else None (only its cursor is advanced past)
Source = Callable[[int, Callable[[int], bool]], Iterator[RowBatch | None]]
_END = object()


@dataclass
class Job:
    """One caching job. `manifest` is the template (n_rows is set after pass 1)."""

    out: Location  # where the store goes: a local folder or any fsspec URL
    manifest: Manifest
    settings: dict[str, Any]  # what must match for --resume (options that change the output)
    row_bound: int  # an upper bound on the rows the source gives, to size the buckets
    max_rows: int | None  # cache exactly this many rows (None: all the source gives)
    shuffle_memory: int  # bytes; see cache_acts.shuffle for the bound
    # the local folder for the bucket files and resume state (`work_dir`)
    work: Path = field(default=Path())
    short_message: str = "the source gives only {n} rows but {want} were asked for"
    # the source's batches carry their packed token sequences (RowBatch.sequences): keep them
    # as the store's `sequences` array
    sequences: bool = False
    nonfinite_hint: str = "the source produced them; fix the source and run again"

    def __post_init__(self) -> None:
        if self.work == Path():
            self.work = work_dir(self.out)


def work_dir(out: Location, tmp_dir: str | None = None) -> Path:
    """Where a run keeps its bucket files and resume state: on local disk always (they are
    appended to and memory-mapped). `<out>/.cache-acts-tmp` for a local --out, else a folder
    under --tmp-dir (or the system temp folder) named from the store's URL, so that --resume
    finds it again (shared.storage.scratch_dir)."""
    scratch = scratch_dir(out, tmp_dir)
    if scratch is not None:
        return scratch
    assert out.local_path is not None
    return tmp_dir_of(out.local_path)


def prepare_out(out: Location, work: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with --out: 'new', 'resume' or 'complete' (nothing left to do)."""
    if out.local_path is not None and out.local_path.exists() and not out.local_path.is_dir():
        fail(f"--out {out} is a file; choose a folder path for the store")
    if overwrite:
        remove_store(out, work)
        return "new"
    entries = _entries(out, work)
    if not entries:
        return "new"
    if not resume:
        fail(f"--out {out} already exists; pass --resume to continue an interrupted run "
             "or --overwrite to replace it")
    if _read_manifest(out).get("complete"):
        return "complete"
    if RunState.load(work) is None:
        if entries == {TMP_DIR}:  # killed before its first commit
            shutil.rmtree(work)
            return "new"
        fail(f"nothing to resume in {out}: it holds no interrupted cache-acts run; "
             "use --overwrite to replace it")
    return "resume"


def _entries(out: Location, work: Path) -> set[str]:
    """The names in --out, leaving out the lock of the run that holds it, and TMP_DIR when the
    run's work folder (wherever it is) holds files."""
    names = set(out.list()) - {LOCK_FILE, TMP_DIR}
    if work.is_dir() and {p.name for p in work.iterdir()} - {LOCK_FILE}:
        names.add(TMP_DIR)
    return names


def _read_manifest(out: Location) -> dict[str, Any]:
    """The manifest of the store at `out` as written so far ({} when there is none)."""
    if not out.exists("zarr.json"):
        return {}
    try:
        group = zarr.open_group(store=out.zarr_store(read_only=True), mode="r", zarr_format=3)
        raw = group.attrs.get(MANIFEST_KEY)
    except Exception:  # noqa: BLE001 - a half-written zarr.json holds no manifest
        return {}
    return dict(raw) if isinstance(raw, dict) else {}


def remove_store(out: Location, work: Path) -> None:
    """Delete the store at `out` for --overwrite: only a store this project wrote (its manifest,
    or the resume state of an interrupted run, says so), and only its own files; anything else
    in the folder stays and is named in the refusal."""
    entries = _entries(out, work)
    if not entries:
        return
    manifest = _read_manifest(out)
    state = RunState.load(work)
    ours = {TMP_DIR} & entries if state is not None else set()
    if manifest or state is not None:  # (a run may stop before the group has its first manifest)
        ours |= {"zarr.json", ACTS_GROUP, *META_ARRAYS, SEQUENCES} & entries
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
        if name == TMP_DIR:
            shutil.rmtree(work)
        else:
            out.remove(name, recursive=True)


def _acts_are_ours(out: Location, hooks: list[Any]) -> bool:
    """acts/ holds only our hook arrays (hook names may nest: `tag/hook`)."""
    allowed = {"zarr.json"} | {str(h).split("/")[0] for h in hooks}
    return set(out.list(ACTS_GROUP)) <= allowed


def run_job(job: Job, source: Source, resume: bool = False, overwrite: bool = False,
            world: World = LOCAL) -> Manifest:
    """Cache the source into job.out on every rank of `world` (rank 0 holds the folder's lock
    and writes the resume state and the manifest); returns the final manifest."""
    # a run failing before it writes leaves no folder; a remote store's run locks its work folder
    # (on this machine: object stores have no locks)
    locked = job.out.local_path or job.work
    lock = exclusive(locked, "cache-acts") if world.is_main else contextlib.nullcontext()
    with lock:
        return _run_locked(job, source, resume, overwrite, world)


def _run_locked(job: Job, source: Source, resume: bool, overwrite: bool, world: World
                ) -> Manifest:
    mode = world.broadcast_object(prepare_out(job.out, job.work, resume, overwrite)
                                  if world.is_main else None)
    tmp = job.work
    if mode == "complete":
        return Manifest.from_dict(world.broadcast_object(
            _already_complete(job).to_dict() if world.is_main else None))
    m = job.manifest
    m.settings = job.settings
    rec = record_dtype(m.hooks, m.d_in, m.dtype)
    state = world.broadcast_object(_first_state(job, mode, rec, world) if world.is_main else None)
    _check_same_folder(state, tmp, world)
    # small, frequent flushes: a big one stalls the model while the queue is full
    flush_bytes = max(min(job.shuffle_memory // 4, FLUSH_BYTES), 1)
    files = BucketFiles(tmp, state.n_buckets, rec, rank=world.rank, n_ranks=world.world_size)
    if state.phase == SCATTER:
        _scatter(job, source, state, files, world, flush_bytes)
    return _gather(job, state, files, world)


def _first_state(job: Job, mode: str, rec: np.dtype, world: World) -> RunState:
    """Rank 0: the resume state to start from (checked), or a new one."""
    tmp = job.work
    if mode == "resume":
        state = RunState.load(tmp)
        assert state is not None
        check_same_settings(state.settings, job.settings, job.out)
        if state.world_size != world.world_size:
            fail(f"the interrupted run in {job.out} was started by {state.world_size} "
                 f"process(es) and this one has {world.world_size}; resume it with the same "
                 "number (torchrun --nnodes x --nproc-per-node), or use --overwrite to start again")
        return state
    k = choose_n_buckets(job.row_bound * rec.itemsize, job.shuffle_memory)
    tmp.mkdir(parents=True, exist_ok=True)
    state = RunState(settings=job.settings, n_buckets=k, world_size=world.world_size,
                     run_id=uuid.uuid4().hex, bucket_bytes=[[0] * k for _ in range(world.world_size)])
    state.save(tmp)
    return state


def _check_same_folder(state: RunState, tmp: Path, world: World) -> None:
    """Every rank must see the work folder rank 0 made (nodes share --out)."""
    if not world.is_main:
        seen = RunState.load(tmp)
        if seen is None or seen.run_id != state.run_id:
            fail(f"rank {world.rank} does not see the work folder {tmp} that rank 0 is using: "
                 "several nodes need --out on storage they all share (a shared file system or "
                 "an object store with a shared --tmp-dir)")
    world.agree()


def _already_complete(job: Job) -> Manifest:
    """--resume of a finished store: nothing to do, if it was made from the same inputs."""
    raw = _read_manifest(job.out)
    if not raw.get("settings"):
        fail(f"{job.out} is a complete store that records no settings (written by an older "
             "version), so it cannot be told whether it matches these options; drop --resume to "
             "use it as it is, or use --overwrite to cache it again")
    check_same_settings(raw["settings"], job.settings, job.out)
    shutil.rmtree(job.work, ignore_errors=True)
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
    """Writer thread of pass 1 on each rank: refuses non-finite values, sums statistics per
    batch and appends the rows to this rank's bucket files. `drain` waits for the queue to
    empty; an error is kept and raised on the main thread by `raise_error`."""

    def __init__(self, job: Job, n_buckets: int, files: BucketFiles):
        super().__init__(daemon=True)
        self.job, self.n_buckets, self.files = job, n_buckets, files
        self.sequences = (SequenceFile(files.folder, job.manifest.context_size)
                          if job.sequences else None)
        self.queue: queue.Queue[tuple[int, RowBatch] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.sums: list[tuple[int, dict[str, BatchSums]]] = []  # (first row, sums) per batch

    def run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None:  # after an error, keep draining so the producer never blocks
                    self._scatter(*item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e
            finally:
                self.queue.task_done()

    def _scatter(self, start: int, batch: RowBatch) -> None:
        m = self.job.manifest
        for hook, x in batch.acts.items():  # before any row of the batch is kept
            bad = count_nonfinite(x, m.dtype)
            if bad:
                fail(_nonfinite_message(self.job, hook, bad, x.size, start, len(batch)))
        self.sums.append((start, {h: batch_sums(x, m.dtype) for h, x in batch.acts.items()}))
        rows = np.arange(start, start + len(batch), dtype=np.int64)
        buckets = bucket_of(rows, m.seed, self.n_buckets)
        self.files.append(to_records(batch, self.files.rec, start), buckets)
        if self.sequences is not None:
            assert batch.sequences is not None, "the source gives no sequences"
            self.sequences.write(batch.first_sequence, batch.sequences)

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> None:
        self.queue.join()
        self.raise_error()

    def stop(self) -> None:
        self.queue.put(None)
        self.join()


@dataclass(frozen=True)
class _Round:
    """What one rank tells the others after a round of the source (one batch per rank)."""

    rows: int  # rows in its batch (0: none)
    cursor: int | None  # the source position after its batch
    saw_end: bool  # the source ended in this round


def _scatter(job: Job, source: Source, state: RunState, files: BucketFiles, world: World,
             flush_bytes: int) -> None:
    """Pass 1: run the source from the committed cursor, batch k of it on rank k mod N, and
    scatter every rank's rows by their global row index. The ranks meet after each round of N
    batches to number the rows, and commit together once the rows scattered since the last
    commit fill a write buffer (so no rank buffers more than one)."""
    files.truncate_to(state.bucket_bytes[world.rank])
    if job.sequences and state.rows_done and not (files.folder / SequenceFile.NAME).exists():
        fail(f"the interrupted run in {job.out} kept no token sequences (started by an older "
             "version, or its temporary files were deleted), so it cannot resume; start again "
             "with --overwrite")
    stats = {h: StatsSums.from_dict(state.stats[h]) if h in state.stats
             else StatsSums(job.manifest.d_in[h]) for h in job.manifest.hooks}
    writer = _Scatterer(job, state.n_buckets, files)
    writer.start()
    rows, cursor, n = state.rows_done, state.cursor, world.world_size
    unflushed = 0  # bytes scattered by all ranks since the last commit
    slots = source(cursor, lambda k: k % n == world.rank)
    bar = tqdm(total=job.max_rows or job.row_bound, initial=rows, unit="tok", unit_scale=True,
               file=sys.stderr, desc="pass 1/2 model+scatter", dynamic_ncols=True,
               disable=None if world.is_main else True)
    try:
        done = job.max_rows is not None and rows >= job.max_rows
        while not done:
            mine, saw_end = None, False
            for k in range(n):  # every rank walks every slot, so all stay at the same cursor
                item = next(slots, _END)
                if item is _END:
                    saw_end = True
                    break
                if k == world.rank:
                    mine = item
            writer.raise_error()
            rounds = world.all_gather_object(_Round(
                len(mine) if mine is not None else 0, mine.cursor if mine is not None else None,
                saw_end))
            start = rows + sum(r.rows for r in rounds[:world.rank])
            total = rows + sum(r.rows for r in rounds)
            if job.max_rows is not None:
                total = min(total, job.max_rows)
            if mine is not None and start < total:
                writer.queue.put((start, mine.head(total - start)))
            cursor = max([r.cursor for r in rounds if r.cursor is not None], default=cursor)
            bar.update(total - rows)
            unflushed += (total - rows) * files.rec.itemsize
            rows = total
            done = any(r.saw_end for r in rounds) or rows == job.max_rows
            if done or unflushed >= flush_bytes:
                _commit_scatter(state, stats, files, writer, world, cursor, rows)
                unflushed = 0
    finally:
        writer.stop()
        bar.close()
    n_rows = state.rows_done
    if (job.max_rows is not None and n_rows < job.max_rows) or n_rows == 0:
        if world.is_main:
            shutil.rmtree(files.folder, ignore_errors=True)  # run_job removes a folder it made
        world.agree()
        if n_rows == 0:
            fail("the source gave no rows to cache; check the dataset and --drop-special")
        fail(job.short_message.format(n=n_rows, want=job.max_rows))
    m = job.manifest
    m.n_rows = n_rows
    state.phase = GATHER
    state.chunks_done = [lo for lo, _ in chunk_ranges(m.n_chunks, m.chunks_per_shard,
                                                     world.world_size)]
    state.checksums = {p: [None] * m.n_chunks for p in m.array_paths()}
    if world.is_main:
        state.save(files.folder)


def _commit_scatter(state: RunState, stats: dict[str, StatsSums], files: BucketFiles,
                    writer: _Scatterer, world: World, cursor: int, rows: int) -> None:
    """Every rank flushes its bucket files; the statistics of every batch scattered since the
    last commit are added in source order; rank 0 saves the state of all ranks."""
    writer.drain()
    files.flush()
    everyone = world.all_gather_object((files.sizes(), writer.sums))
    writer.sums = []
    for _, sums in sorted((item for _, batches in everyone for item in batches),
                          key=lambda item: item[0]):
        for hook, s in sums.items():
            stats[hook].add(s)
    state.cursor, state.rows_done = cursor, rows
    state.bucket_bytes = [sizes for sizes, _ in everyone]
    state.stats = {h: st.to_dict() for h, st in stats.items()}
    if world.is_main:
        state.save(files.folder)


def _open_for_writing(out: Location) -> zarr.Group:
    return zarr.open_group(store=out.zarr_store(read_only=False), mode="a", zarr_format=3)


def _shard_sink(group: zarr.Group, out: Location, m: Manifest, scratch: Path) -> ShardSink:
    """Raw shard files for uncompressed local stores (same bytes, no zarr overhead), else zarr."""
    raw = raw_shards_or_none(group, out.local_path, m, scratch) if out.is_local else None
    return raw if raw is not None else ZarrShards(group, m.chunk_rows, m.shard_rows, m.n_rows)


def chunk_ranges(n_chunks: int, per_shard: int, n_ranks: int) -> list[tuple[int, int]]:
    """Each rank's range [lo, hi) of output chunks in pass 2: whole shards, contiguous (so a
    rank reads a contiguous run of buckets), as even as the shards allow."""
    n_shards = -(-n_chunks // per_shard)
    bounds = [min(n_chunks, r * n_shards // n_ranks * per_shard) for r in range(n_ranks + 1)]
    return list(itertools.pairwise(bounds))


class _Progress:
    """Pass 2's view of every rank's progress (the same on every rank): how many chunks are
    committed, and which bucket files a chunk still to write needs."""

    def __init__(self, state: RunState, ranges: list[tuple[int, int]], bucket_rows: list[int],
                 chunk_rows: int):
        self.state, self.ranges = state, ranges
        rows = np.asarray(bucket_rows)
        self.last = np.asarray(last_chunk_of_buckets(bucket_rows, chunk_rows))  # [K], -1: empty
        self.first = (np.cumsum(rows) - rows) // chunk_rows  # [K] first chunk of each bucket

    def committed(self) -> int:
        return sum(done - lo for (lo, _), done in zip(self.ranges, self.state.chunks_done,
                                                     strict=True))

    def needed(self) -> np.ndarray:
        """[K] bool: buckets with a row in a chunk not yet committed."""
        done = np.zeros(self.ranges[-1][1] + 1, dtype=np.int64)  # prefix counts of committed
        for (lo, _), upto in zip(self.ranges, self.state.chunks_done, strict=True):
            done[lo + 1:upto + 1] = 1
        counts = np.cumsum(done)
        spans = self.last + 1 - self.first
        return (self.last >= 0) & (counts[self.last + 1] - counts[self.first] < spans)


def _gather(job: Job, state: RunState, files: BucketFiles, world: World) -> Manifest:
    """Pass 2: each rank writes the shuffled rows of its range of shards (whole chunks gathered
    into shards); the ranks meet after every sealed shard, where rank 0 commits the progress of
    all of them and deletes the bucket files no longer needed; then rank 0 writes the manifest."""
    m = job.manifest
    assert m.shard_rows is not None, "stores are written sharded (format 2)"
    m.n_rows = state.rows_done
    m.complete = False
    per_shard = m.chunks_per_shard
    ranges = chunk_ranges(m.n_chunks, per_shard, world.world_size)
    if world.is_main and state.chunks_done == [lo for lo, _ in ranges]:  # no shard committed
        create_arrays(_open_for_writing(job.out), m)
    world.agree()  # the arrays exist before any rank opens them
    group = _open_for_writing(job.out)
    rec_size = files.rec.itemsize
    bucket_rows = [[b // rec_size for b in sizes] for sizes in state.bucket_bytes]
    per_bucket = [sum(parts) for parts in zip(*bucket_rows, strict=True)]
    assert sum(per_bucket) == m.n_rows
    progress = _Progress(state, ranges, per_bucket, m.chunk_rows)
    files.check(state.bucket_bytes, needed=progress.needed())
    lo, hi = ranges[world.rank]
    start = state.chunks_done[world.rank]
    remaining = [-(-(r_hi - done) // per_shard)
                 for (_, r_hi), done in zip(ranges, state.chunks_done, strict=True)]
    bar = tqdm(total=m.n_chunks, initial=progress.committed(), unit="chunk",
               file=sys.stderr, desc="pass 2/2 shuffle+write", dynamic_ncols=True,
               disable=None if world.is_main else True)
    sink = _shard_sink(group, job.out, m, files.folder)
    written: dict[str, dict[int, int]] = {}  # this rank's checksums since the last meeting
    removed = ~progress.needed()

    def meet() -> None:
        """Where the ranks commit together (every rank calls it max(remaining) times)."""
        nonlocal written
        everyone = world.all_gather_object((state.chunks_done[world.rank], written))
        written = {}
        before = progress.committed()
        for rank, (done, sums) in enumerate(everyone):
            state.chunks_done[rank] = done
            for path, crcs in sums.items():
                for chunk, crc in crcs.items():
                    state.checksums[path][chunk] = crc
        bar.update(progress.committed() - before)
        if world.is_main:
            state.save(files.folder)
            # A bucket whose rows are all in committed shards is never read again, even on
            # resume: deleting it at once bounds the temporary disk space and gives its
            # page-cache pages back for the shards still to write (far cheaper than fresh ones
            # on a VM).
            for b in np.flatnonzero(~progress.needed() & ~removed):
                files.remove(int(b))
                removed[b] = True

    def commit(index: int, sums: dict[str, int]) -> None:  # chunks start..index are put
        for path, crc in sums.items():
            written.setdefault(path, {})[index] = crc
        if (index + 1 - lo) % per_shard and index + 1 < hi:
            return  # its shard is not whole yet: nothing is durable until it is sealed
        sink.seal(index // per_shard)
        state.chunks_done[world.rank] = index + 1
        meet()

    # two writers for raw shard files (page-cache copies scale with cores, and the model is
    # idle in pass 2); one through the zarr API, whose codecs have their own threads
    writer = ChunkWriterPool(lambda index, records: write_chunk(sink, index, records), commit,
                             workers=2 if isinstance(sink, RawShards) else 1)
    try:
        for index, records in iter_chunks(files, bucket_rows, m.seed, m.chunk_rows,
                                          start_chunk=start, stop_chunk=hi):
            writer.submit(index, records)
    finally:
        writer.finish()
    for _ in range(max(remaining) - remaining[world.rank]):
        meet()  # this rank had fewer shards left than another
    bar.close()
    if world.is_main:
        m.stats = {h: StatsSums.from_dict(state.stats[h]).result() for h in m.hooks}
        m.checksums = {p: state.checksums[p] for p in m.array_paths()}
        assert all(c is not None for sums in m.checksums.values() for c in sums)
        if job.sequences:  # (rewritten whole by a resumed run: small, and the same bytes)
            sequences = SequenceFile(files.folder, m.context_size).rows()
            if len(sequences) == 0:
                fail(f"the token sequences of the run in {job.out} are missing from its "
                     f"temporary folder {files.folder}; start again with --overwrite")
            write_sequences(group, m, sequences)
        m.complete = True
        write_manifest(group, m)  # the last step: from here on the store reads as complete
        shutil.rmtree(files.folder, ignore_errors=True)
    world.agree()
    return m
