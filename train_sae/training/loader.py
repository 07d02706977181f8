"""Stream batches of activations out of a store, for training.

The store's rows are already one uniformly random permutation of the cached tokens, so a
contiguous block of rows is a random sample: the loader reads whole row chunks contiguously and
never gathers single rows. One epoch is every chunk once, in a seeded chunk order, each chunk read
from a seeded rotation point (so batches are cut differently in each epoch). Epochs are laid end
to end as one stream of rows and batch i is rows [i * batch_size, (i + 1) * batch_size) of that
stream, so batch i is a pure function of (store, hooks, batch_size, seed, i): a loader built with
`start_batch=i` yields exactly the tail an uninterrupted one would have yielded from batch i, and
every row appears exactly once in each epoch's span of the stream.

Reading: local uncompressed stores are read by memory-mapping each row chunk where it lies
(`Store.chunk_span`: at its offset in a shard, from the shard's index, or a format-1 chunk file;
every chunk holds `chunk_rows` rows, the last one zero-padded); compressed stores go through
the Zarr API, decoding each chunk once per visit. Every hook is read at the same rows, so row j of
every hook in a batch is the same token. float16 and bfloat16 (stored as uint16 bits) are widened
to float32, and rows are multiplied by `sqrt(d_in) / mean_norm` from the manifest statistics.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import UserError, fail
from shared.storage import ReadAhead
from shared.store import STORAGE_DTYPES, TORCH_DTYPES, Store, acts_path, checksum, count_nonfinite

THREAD_NAME = "ActivationLoader"
_POLL_S = 0.1  # how often a thread blocked on the queue checks for a stop request
_OPEN_MAPS = 8  # memory-maps kept open per loader (each holds a file descriptor)
READ_AHEAD = 8  # row chunks fetched ahead (and held at most) by a compressed or remote store's reader
_PLAN_AHEAD = 1024  # batches whose chunks are queued ahead, at most


@dataclass(frozen=True)
class Segment:
    """`n` contiguous store rows of row chunk `chunk`, starting `start` rows into that chunk."""

    chunk: int
    start: int
    n: int


class BatchPlan:
    """Where the rows of batch i come from: the seeded epoch layout of the store's row chunks."""

    def __init__(self, n_rows: int, chunk_rows: int, batch_size: int, seed: int):
        self.n_rows, self.chunk_rows, self.batch_size, self.seed = (
            n_rows, chunk_rows, batch_size, seed,
        )
        n_chunks = -(-n_rows // chunk_rows)
        self.chunk_len = np.full(n_chunks, chunk_rows, dtype=np.int64)  # [n_chunks]
        self.chunk_len[-1] = n_rows - (n_chunks - 1) * chunk_rows
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk order [n_chunks], stream offset of each ordered chunk [n_chunks + 1],
        rotation point of each chunk [n_chunks]) for one epoch."""
        with self._lock:  # the producer thread and `ActivationLoader.batch` may both ask
            layout = self._epochs.get(epoch)
            if layout is None:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(len(self.chunk_len))
                offsets = np.concatenate([[0], np.cumsum(self.chunk_len[order])])
                rotation = rng.integers(0, self.chunk_len)
                layout = self._epochs[epoch] = (order, offsets, rotation)
                while len(self._epochs) > 2:
                    self._epochs.popitem(last=False)
            return layout

    def segments(self, batch: int) -> list[Segment]:
        """The contiguous store-row pieces that make up batch `batch`, in batch order."""
        pos, left = batch * self.batch_size, self.batch_size
        out: list[Segment] = []
        while left > 0:
            epoch, q = divmod(pos, self.n_rows)
            order, offsets, rotation = self.epoch_layout(epoch)
            k = int(np.searchsorted(offsets, q, side="right")) - 1
            chunk = int(order[k])
            length = int(self.chunk_len[chunk])
            into = q - int(offsets[k])  # rows of this chunk already streamed
            start = (int(rotation[chunk]) + into) % length
            n = min(left, length - into, length - start)  # stop at the chunk end or wrap point
            out.append(Segment(chunk, start, n))
            pos, left = pos + n, left - n
        return out


class ChunkVerifier:
    """Checks each row chunk the first time a loader reads it: its CRC32 against the manifest
    (a flipped byte, a swapped or stale chunk file stops training instead of training on it)
    and that it holds no NaN/inf (stores written before cache-acts refused them may). Costs one
    extra pass over each chunk per loader (see the README's loader benchmark)."""

    def __init__(self, store: Store):
        self.store = store
        self._done: set[tuple[str, int]] = set()
        self._lock = threading.Lock()  # the producer thread and `ActivationLoader.batch` share it

    def check(self, hook: str, chunk: int, rows: np.ndarray) -> None:
        """rows: the chunk's valid rows [<= chunk_rows, d_in] as stored."""
        key = (hook, chunk)
        with self._lock:
            if key in self._done:
                return
        m = self.store.manifest
        recorded = m.checksums.get(acts_path(hook), [])
        found = checksum(rows)
        if chunk >= len(recorded) or found != recorded[chunk]:
            fail(f"row chunk {chunk} of hook {hook!r} in store {self.store.path} fails its "
                 f"checksum (CRC32 {found:#010x}, the manifest says "
                 f"{recorded[chunk] if chunk < len(recorded) else 'nothing'}): the store is "
                 f"damaged; see `cache-acts verify {self.store.path}` and recreate it")
        bad = count_nonfinite(rows, m.dtype)
        if bad:
            fail(f"store {self.store.path} holds {bad:,} NaN/inf values in row chunk {chunk} of "
                 f"hook {hook!r} (it was written before cache-acts refused them); the store, not "
                 "the learning rate, is at fault: recreate it (with --dtype bfloat16 or float32 "
                 "if float16 overflowed)")
        with self._lock:
            self._done.add(key)


class _MemmapReader:
    """Rows of uncompressed local chunks (in chunk files or shards), through a small cache of
    open memory-maps."""

    def __init__(self, store: Store, verifier: ChunkVerifier):
        self.store = store
        self.dtype = STORAGE_DTYPES[store.manifest.dtype]
        self._maps: OrderedDict[tuple[str, int], np.memmap] = OrderedDict()
        self.verifier = verifier

    def plan(self, batch: int, rows: range) -> None:
        """Memory-maps need no read-ahead (the OS pages them in)."""

    def lookahead_wanted(self) -> bool:
        return False

    def close(self) -> None:
        self._maps.clear()

    def read(self, hook: str, seg: Segment) -> np.ndarray:
        key = (hook, seg.chunk)
        if key not in self._maps:
            self._maps[key] = self._open(hook, seg.chunk)
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return self._maps[key][seg.start : seg.start + seg.n]

    def _open(self, hook: str, chunk: int) -> np.memmap:
        m = self.store.manifest
        span = self.store.chunk_span(acts_path(hook), chunk)  # checks the object's size/index
        shape = (m.chunk_rows, m.d_in[hook])  # every chunk is stored full size, the last padded
        rows = np.memmap(span.file, dtype=self.dtype, mode="r", offset=span.offset, shape=shape)
        valid = min(m.chunk_rows, m.n_rows - chunk * m.chunk_rows)
        self.verifier.check(hook, chunk, rows[:valid])
        return rows


class _ZarrReader:
    """Rows of a compressed store through the Zarr API, or of a remote uncompressed one by
    ranged reads at the offsets of its shard indexes; each row chunk read once per visit. The
    chunks of the batches ahead are fetched in parallel on `READ_AHEAD` threads (at most that
    many held at once), so a remote store's round trips overlap: `plan(batch, rows)` queues a
    batch's chunks in the order `read` will ask for them."""

    def __init__(self, store: Store, verifier: ChunkVerifier, plan: BatchPlan, hooks: list[str]):
        self.store, self.verifier, self.batch_plan, self.hooks = store, verifier, plan, hooks
        self._chunk: dict[str, tuple[int, np.ndarray]] = {}  # hook -> (chunk, its decoded rows)
        self._planned: dict[str, int] = {}  # hook -> the last chunk queued
        self.ahead: ReadAhead[tuple[str, int], np.ndarray] = ReadAhead(self._fetch, READ_AHEAD)

    def plan(self, batch: int, rows: range) -> None:
        """Queue the chunks of rows `rows` of batch `batch`."""
        keys = []
        for seg in _rows_of(self.batch_plan.segments(batch), rows.start, rows.stop):
            for hook in self.hooks:
                if self._planned.get(hook) != seg.chunk:  # a new visit to a chunk
                    self._planned[hook] = seg.chunk
                    keys.append((hook, seg.chunk))
        self.ahead.prefetch(keys)

    def lookahead_wanted(self) -> bool:
        """Fewer chunks queued than the read-ahead can fetch: plan another batch."""
        return self.ahead.pending() < 2 * READ_AHEAD

    def read(self, hook: str, seg: Segment) -> np.ndarray:
        cached = self._chunk.get(hook)
        if cached is None or cached[0] != seg.chunk:
            cached = self._chunk[hook] = (seg.chunk, self.ahead.get((hook, seg.chunk)))
        return cached[1][seg.start : seg.start + seg.n]

    def _fetch(self, key: tuple[str, int]) -> np.ndarray:
        hook, chunk = key
        rows = self.store.manifest.chunk_rows
        lo = chunk * rows
        hi = min(lo + rows, self.store.n_rows)
        try:
            if self.store.manifest.compression in (None, "none"):  # a remote uncompressed store
                data = self.store.read_chunk(hook, chunk)  # one ranged request
            else:
                data = np.asarray(self.store.acts(hook)[lo:hi])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to decode is a damaged store
            raise UserError(
                f"cannot read rows {lo}-{hi} of hook {hook!r} from {self.store.path} ({e}); "
                "the store is damaged or unreachable: check it with `cache-acts verify` and "
                "recreate it with `cache-acts run --overwrite`"
            ) from e
        self.verifier.check(hook, chunk, data)
        return data

    def close(self) -> None:
        self.ahead.close()


def _decode_into(src: np.ndarray, dst: np.ndarray, dtype: str, scale: float) -> None:
    """dst [n, d_in] float32 = src [n, d_in] (stored as `dtype`) widened exactly, times `scale`.

    numpy rather than torch: one single-threaded pass that leaves torch's thread pool to the
    trainer on the consumer side.
    """
    factor = np.float32(scale)
    if dtype == "bfloat16":  # a bfloat16 is the upper 16 bits of a float32
        np.left_shift(src, np.uint32(16), out=dst.view(np.uint32))
        if scale != 1.0:
            np.multiply(dst, factor, out=dst)
    elif scale != 1.0:
        np.multiply(src, factor, out=dst)  # computed in float32 (NEP 50: float32 scalar)
    else:
        np.copyto(dst, src)


@dataclass
class _Failure:
    """An exception raised on the producer thread, handed to the consumer to re-raise."""

    error: BaseException


class ActivationLoader:
    """Batches {hook: [batch_size, d_in] float32 on `device`, scaled} from a store.

    Batches `start_batch .. n_batches - 1` are built on one background thread and handed over
    through a queue of at most `prefetch` batches, so host memory stays below
    `(prefetch + 2) * batch_size * sum(d_in) * 4` bytes (queued batches, one being built, one
    held by the consumer, plus any the consumer keeps) whatever the store's size; a compressed store adds one decoded row chunk
    per hook (`chunk_rows * d_in * itemsize`). Memory-mapped pages are the OS page cache's.
    On CUDA, batches are built in pinned memory and copied with `non_blocking=True`; a 16-bit
    store (bfloat16, float16) crosses as its stored 16 bits and is widened and scaled on the GPU
    (`ship_raw`: half the host-to-device bytes, the same float32 values).

    Iterating again continues after the last batch handed out (`len()` counts what is left).
    The thread stops when the consumer's loop ends, breaks, raises, or drops the iterator, or on
    `close()`; an error on the thread is re-raised in the consumer. If `batch_size` does not
    divide the store's rows, a batch at an epoch boundary holds the end of one epoch and the
    start of the next.
    """

    def __init__(
        self,
        store: Store,
        hooks: list[str],
        batch_size: int,
        n_batches: int,
        seed: int = 0,
        device: str = "cpu",
        start_batch: int = 0,
        normalize: bool = True,
        prefetch: int = 4,
        rows: slice = slice(None),
        ship_raw: bool | None = None,
    ):
        m = store.manifest
        if not hooks:
            fail(f"no hooks to load; choose from: {', '.join(m.hooks)}")
        if len(set(hooks)) != len(hooks):
            fail(f"hooks are listed twice in {hooks}; name each hook once")
        for hook in hooks:
            store.check_hook(hook)
        if not 1 <= batch_size <= m.n_rows:
            fail(
                f"batch size must be between 1 and the store's {m.n_rows} rows (got {batch_size}); "
                "choose a smaller batch size or cache more tokens"
            )
        if n_batches < 0:
            fail(f"the number of batches must be >= 0 (got {n_batches})")
        if not 0 <= start_batch <= n_batches:
            fail(f"start batch {start_batch} is outside 0..{n_batches}; resume from a batch in range")
        if prefetch < 1:
            fail(f"prefetch must be >= 1 batch (got {prefetch})")
        self.device = _check_device(device)
        self.store, self.hooks = store, list(hooks)
        self.batch_size, self.n_batches, self.seed = batch_size, n_batches, seed
        self.prefetch, self.normalize = prefetch, normalize
        self.scales: dict[str, float] = {h: _scale(store, h) if normalize else 1.0 for h in hooks}
        self.plan = BatchPlan(m.n_rows, m.chunk_rows, batch_size, seed)
        # the rows [lo, hi) of every batch this loader reads (a data-parallel rank's share)
        self.rows = range(batch_size)[rows]
        if self.rows.step != 1 or not self.rows:
            fail(f"the rows {rows} of a batch of {batch_size} are not a non-empty contiguous range")
        self._pin = self.device.type == "cuda"
        # a 16-bit store goes to the GPU as its stored 16 bits (half the host-to-device bytes)
        # and is widened and scaled there; on the CPU it is widened while the batch is built
        self.ship_raw = ship_raw if ship_raw is not None else (
            self.device.type == "cuda" and m.dtype in ("bfloat16", "float16"))
        self._next = start_batch
        self._stops: list[threading.Event] = []
        self.verifier = ChunkVerifier(store)

    def __len__(self) -> int:
        return self.n_batches - self._next

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first = self._next
        handoff: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = self._reader()
        thread = threading.Thread(
            target=self._produce, args=(reader, first, handoff, stop), name=THREAD_NAME, daemon=True
        )
        self._stops.append(stop)
        thread.start()
        mover = self._copy_stream()
        try:
            yield from self._handed_over(range(first, self.n_batches), handoff, stop, thread,
                                         mover)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue, then wait
                try:
                    handoff.get(timeout=_POLL_S)
                except queue.Empty:
                    pass
            thread.join()
            self._stops.remove(stop)

    def _copy_stream(self) -> _CopyStream | None:
        return _CopyStream(self.device) if self.device.type == "cuda" else None

    def _handed_over(self, batches: range, handoff: queue.Queue, stop: threading.Event,
                     thread: threading.Thread, mover: _CopyStream | None
                     ) -> Iterator[dict[str, torch.Tensor]]:
        """The producer's batches on the device, in order. With a copy stream (CUDA), batch
        i + 1's host-to-device copy (and widening) is queued on it before batch i is handed
        over, so it runs while the GPU computes on batch i."""
        pending = None  # (index, batch being copied on the copy stream)
        for i in batches:
            item = _get(handoff, stop, thread)
            if item is None:  # close() was called
                return
            if isinstance(item, _Failure):
                raise item.error
            if mover is None:
                self._next = i + 1
                yield self._to_device(item)
                continue
            moving = (i, mover.start(lambda item=item: self._to_device(item)))
            if pending is not None:
                self._next = pending[0] + 1
                yield mover.ready(pending[1])
            pending = moving
        if pending is not None and mover is not None:
            self._next = pending[0] + 1
            yield mover.ready(pending[1])

    def close(self) -> None:
        """Ask every running producer thread of this loader to stop."""
        for stop in list(self._stops):
            stop.set()

    def batch(self, i: int, whole: bool = False) -> dict[str, torch.Tensor]:
        """Batch i (`whole`: all its rows, not only this loader's share) on the device, built
        synchronously on the calling thread."""
        rows = range(self.batch_size) if whole else self.rows
        reader = self._reader()
        try:
            reader.plan(i, rows)
            return self._to_device(self._build(i, reader, rows))
        finally:
            reader.close()

    def _to_device(self, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A built batch on the device as float32, scaled: raw 16-bit batches are widened (exactly)
        and scaled there, as `_decode_into` does on the host."""
        if self.device.type != "cpu":
            item = {h: x.to(self.device, non_blocking=True) for h, x in item.items()}
        if not self.ship_raw:
            return item
        wide = TORCH_DTYPES[self.store.manifest.dtype]
        out = {}
        for h, raw in item.items():
            x = raw.view(wide).float()
            out[h] = x.mul_(self.scales[h]) if self.scales[h] != 1.0 else x
        return out

    def _reader(self) -> _MemmapReader | _ZarrReader:
        if self.store.memmappable():
            return _MemmapReader(self.store, self.verifier)
        return _ZarrReader(self.store, self.verifier, self.plan, self.hooks)

    def _build(self, i: int, reader: _MemmapReader | _ZarrReader, rows: range | None = None
               ) -> dict[str, torch.Tensor]:
        """Rows `rows` (default: this loader's share) of batch i."""
        rows = self.rows if rows is None else rows
        dtype = self.store.manifest.dtype
        segments = _rows_of(self.plan.segments(i), rows.start, rows.stop)
        out: dict[str, torch.Tensor] = {}
        for hook in self.hooks:
            d_in = self.store.manifest.d_in[hook]
            if self.ship_raw:  # the stored 16 bits, widened on the device (`_to_device`)
                x = torch.empty(len(rows), d_in, dtype=torch.int16, pin_memory=self._pin)
                x_np = x.numpy().view(STORAGE_DTYPES[dtype])
            else:
                x = torch.empty(len(rows), d_in, dtype=torch.float32, pin_memory=self._pin)
                x_np = x.numpy()  # [rows, d_in] float32, shares memory with x
            row = 0
            for seg in segments:
                src = reader.read(hook, seg)
                if self.ship_raw:
                    np.copyto(x_np[row : row + seg.n], src)
                else:
                    _decode_into(src, x_np[row : row + seg.n], dtype, self.scales[hook])
                row += seg.n
            out[hook] = x
        return out

    def _produce(
        self, reader: _MemmapReader | _ZarrReader, first: int, handoff: queue.Queue,
        stop: threading.Event,
    ) -> None:
        planned = first  # batches whose chunks the reader has queued
        try:
            for i in range(first, self.n_batches):
                if stop.is_set():
                    return
                while planned < min(self.n_batches, i + _PLAN_AHEAD) and (
                        planned <= i or reader.lookahead_wanted()):
                    reader.plan(planned, self.rows)
                    planned += 1
                if not _put(handoff, self._build(i, reader), stop):
                    return
        except BaseException as e:  # noqa: BLE001 - every failure is re-raised in the consumer
            _put(handoff, _Failure(e), stop)
        finally:
            reader.close()


class _CopyStream:
    """Host-to-device copies on a CUDA stream of their own, so that they overlap the compute on
    the current stream (the batches come from pinned memory, so the copies are asynchronous)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.device = device

    def start(self, move: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Queue `move()` (the copies and the widening of one batch) on the copy stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its memory is free
        with torch.cuda.stream(self.stream):
            return move()

    def ready(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch, usable on the current stream: it waits for the copies, and the caching
        allocator is told the batch is used there (so its memory is not reused too early)."""
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for x in batch.values():
            x.record_stream(current)
        return batch


def _rows_of(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The pieces of a batch's segments (in batch order) that hold its rows [lo, hi)."""
    out, row = [], 0
    for seg in segments:
        a, b = max(lo, row), min(hi, row + seg.n)
        if a < b:
            out.append(Segment(seg.chunk, seg.start + a - row, b - a))
        row += seg.n
    return out


def _get(handoff: queue.Queue, stop: threading.Event, thread: threading.Thread) -> object:
    """The next item from the producer, or None once the loader was closed (even with batches
    still queued)."""
    while True:
        if stop.is_set():
            return None
        try:
            return handoff.get(timeout=_POLL_S)
        except queue.Empty:
            if stop.is_set():
                return None
            if not thread.is_alive() and handoff.empty():
                raise RuntimeError("the loader thread ended without handing over a batch") from None


def _put(handoff: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` unless asked to stop first; True when it was put."""
    while not stop.is_set():
        try:
            handoff.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _scale(store: Store, hook: str) -> float:
    # Anthropic April 2024 update: scale inputs so that E||x|| = sqrt(d_in) (seed 004).
    stats = store.manifest.stats.get(hook)
    if stats is not None and not math.isfinite(stats.mean_norm):
        fail(f"store {store.path} records a mean norm of {stats.mean_norm} for hook {hook!r} "
             "(its statistics overflowed when it was written); recreate it with this version, "
             "which computes them in float64, or pass --no-normalize")
    if stats is None or not stats.mean_norm > 0:
        fail(
            f"store {store.path} has no mean-norm statistic for hook {hook!r}, needed to scale "
            "activations; recreate the store with `cache-acts run` or pass --no-normalize"
        )
    return math.sqrt(store.manifest.d_in[hook]) / stats.mean_norm


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        fail(f"unknown device {device!r} ({e}); use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPUs")
    if dev.type not in ("cpu", "cuda"):
        fail(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


