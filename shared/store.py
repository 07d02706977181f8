"""The activation store: one Zarr v3 group that both stages agree on.

Layout (any Zarr v3 client can read it):

    <store>/
      acts/<hook_name>   (n_rows, d_in)  float32 | float16 | uint16 (= bfloat16 bits)
      token_ids          (n_rows,)       int32   token at that row
      seq_index          (n_rows,)       int64   which packed sequence (or imported file) it came from
      position           (n_rows,)       int32   position inside that sequence (or row in that file)
      sequences          (n_sequences, context_size) int32  the packed token sequences (`cache-acts
                         run` stores only; absent in imported stores and stores written before it)
      attrs["manifest"]  see `Manifest`

All row arrays share one row chunking, so row i of every array is the same token. Rows are one
uniformly random permutation of the cached tokens; a contiguous block of rows is a random sample.
A row's context is `sequences[seq_index, :position + 1]` (and the tokens after it: the rest of
that sequence). `sequences` has its own chunking along sequences (`sequence_chunk_rows`, about
1 MiB per chunk, sharded like the row arrays), sequence i of the token source being row i, and a
CRC32 per chunk under `checksums["sequences"]`; `n_sequences` is None when it is absent.

Format 2 (this version) stores each array with the Zarr v3 sharding codec: `shard_rows` rows
(a multiple of `chunk_rows`) per shard object at `<array>/c/<shard>[/0]`, each shard holding its
row chunks back to back and an index (shared/shards.py). So a store has a few objects per array
instead of one per chunk, and any Zarr v3 client reads it unchanged. Format 1 (one object per
chunk, `shard_rows` absent) is still read. Checksums are per row chunk in both.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from shared import shards
from shared.errors import fail
from shared.fingerprint import digest_of, digests
from shared.storage import Location, as_location

# Every chunk gets a file, even an all-zero one, so readers can memory-map chunk files blindly.
# (Zarr's runtime config is per process and not stored in the arrays, so it is set here, where
# every writer of a store imports it.)
zarr.config.set({"array.write_empty_chunks": True})

FORMAT_VERSION = 2
SHARD_BYTES = 128 << 20  # default size of the widest array's shard objects (--shard-rows auto)
MANIFEST_KEY = "manifest"
# where `cache-acts` keeps its bucket files and resume state while a store is being written
WORK_DIR = ".cache-acts-tmp"
ACTS_GROUP = "acts"
META_ARRAYS = {"token_ids": np.int32, "seq_index": np.int64, "position": np.int32}
SEQUENCES = "sequences"  # the packed token sequences (n_sequences, context_size) int32
SEQUENCE_CHUNK_BYTES = 1 << 20  # about this many bytes per chunk of `sequences`

# Zarr v3 has no bfloat16: its raw bits are stored as uint16 and the logical dtype is recorded.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def check_dtype(name: str) -> str:
    if name not in STORAGE_DTYPES:
        fail(f"unknown dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}")
    return name


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations [rows, d] -> the numpy array written to the store for logical `dtype`."""
    x = x.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a stored numpy block -> a torch tensor of the logical dtype."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16)
    return t


def default_shard_rows(chunk_rows: int, d_in: dict[str, int], dtype: str, max_rows: int) -> int:
    """Whole chunks per shard such that a shard of the widest hook holds about SHARD_BYTES (at
    least one chunk): few objects on object stores, and reads of one chunk stay small. No
    bigger than a store of `max_rows` rows needs: a shard's index has an entry for each of its
    chunks, present or not."""
    widest = max(d_in.values()) * STORAGE_DTYPES[dtype].itemsize
    chunks = min(SHARD_BYTES // (chunk_rows * widest), -(-max_rows // chunk_rows))
    return chunk_rows * max(1, chunks)


def resolve_shard_rows(requested: int | None, chunk_rows: int, d_in: dict[str, int], dtype: str,
                       max_rows: int) -> int:
    """--shard-rows: the rows given (checked), or the default for a store of at most
    `max_rows` rows when None."""
    if requested is None:
        return default_shard_rows(chunk_rows, d_in, dtype, max_rows)
    if requested < chunk_rows or requested % chunk_rows:
        lower = max(chunk_rows, requested // chunk_rows * chunk_rows)
        fail(f"--shard-rows {requested} must be a whole multiple of --chunk-rows {chunk_rows} "
             f"(e.g. {lower} or {lower + chunk_rows})")
    return requested


def checksum(a: np.ndarray) -> int:
    """CRC32 of an array's bytes in C order; used per chunk to verify a store."""
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)


def count_nonfinite(a: np.ndarray, dtype: str) -> int:
    """NaN/inf values in a stored block (bfloat16 as uint16 bits: NaN/inf have every exponent
    bit set)."""
    if dtype == "bfloat16":
        return int(np.count_nonzero((a & 0x7F80) == 0x7F80))
    return a.size - int(np.count_nonzero(np.isfinite(a)))


@dataclass
class HookStats:
    """Per-hook statistics computed while caching (float64 sums, so exact enough at any size)."""

    mean: list[float]
    mean_norm: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HookStats:
        return cls(mean=list(d["mean"]), mean_norm=float(d["mean_norm"]))


@dataclass
class Manifest:
    """Everything a reader needs to know about a store; kept in the group's attributes."""

    model: str
    hooks: list[str]
    d_in: dict[str, int]
    dtype: str
    n_rows: int
    context_size: int
    seed: int
    chunk_rows: int
    prepend_bos: bool = False
    dataset: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None
    complete: bool = False
    stats: dict[str, HookStats] = field(default_factory=dict)
    # array path -> CRC32 of each row chunk, in chunk order (see `checksum`)
    checksums: dict[str, list[int]] = field(default_factory=dict)
    # for `cache-acts import`: the source files, in the order seq_index refers to them
    source_files: list[str] = field(default_factory=list)
    # free-form facts about the model (n_layers, d_vocab, tokenizer name, ...)
    model_info: dict[str, Any] = field(default_factory=dict)
    # what the inputs are by content (shared.fingerprint): {"model": fp, or {tag: fp} for several
    # models, or None for imports; "dataset": fp of the token source or of the imported files}
    fingerprints: dict[str, Any] = field(default_factory=dict)
    # the options that decided the bytes (cache-acts' resume settings); a --resume must repeat them
    settings: dict[str, Any] = field(default_factory=dict)
    # rows per shard object (a multiple of chunk_rows); None: one object per chunk (as in every
    # format-1 store, and in stores that tests and benchmarks build through `create_store`)
    shard_rows: int | None = None
    # the packed token sequences (`SEQUENCES`): how many, and sequences per chunk; None when the
    # store has none (imported, or written before stores kept them)
    n_sequences: int | None = None
    sequence_chunk_rows: int | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Raises ValueError (or KeyError/TypeError) for a malformed manifest."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["stats"] = {h: HookStats.from_dict(s) for h, s in d.get("stats", {}).items()}
        m = cls(**d)
        m._check()
        return m

    def _check(self) -> None:
        """The types and relations every reader relies on."""
        ints = (self.n_rows, self.chunk_rows, self.context_size, self.seed, self.format_version)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ValueError("n_rows, chunk_rows, context_size, seed and format_version must be "
                             "whole numbers")
        if self.n_rows < 0 or self.chunk_rows < 1:
            raise ValueError(f"n_rows {self.n_rows} / chunk_rows {self.chunk_rows} out of range")
        if self.shard_rows is not None and not (
                isinstance(self.shard_rows, int) and self.shard_rows >= self.chunk_rows
                and self.shard_rows % self.chunk_rows == 0):
            raise ValueError(f"shard_rows {self.shard_rows!r} is not a multiple of chunk_rows")
        if not isinstance(self.hooks, list) or not all(isinstance(h, str) for h in self.hooks):
            raise ValueError("hooks must be a list of names")
        if set(self.d_in) != set(self.hooks) or not all(
                isinstance(v, int) and v > 0 for v in self.d_in.values()):
            raise ValueError("d_in must give a positive width for every hook")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.complete and any(len(self.checksums.get(p, [])) != self.n_chunks
                                 for p in self.array_paths()):
            raise ValueError("a complete store needs one checksum per chunk of every array")
        if (self.n_sequences is None) != (self.sequence_chunk_rows is None):
            raise ValueError("n_sequences and sequence_chunk_rows go together")
        if self.n_sequences is not None:
            seq = (self.n_sequences, self.sequence_chunk_rows)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in seq):
                raise ValueError(f"n_sequences / sequence_chunk_rows {seq} out of range")
            if self.complete and len(self.checksums.get(SEQUENCES, [])) != self.n_sequence_chunks:
                raise ValueError("a complete store needs one checksum per chunk of sequences")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def chunks_per_shard(self) -> int:
        """Row chunks per stored object (1 for a format-1 store)."""
        return (self.shard_rows or self.chunk_rows) // self.chunk_rows

    @property
    def n_objects(self) -> int:
        """Stored objects per array."""
        return -(-self.n_chunks // self.chunks_per_shard)

    @property
    def n_sequence_chunks(self) -> int:
        assert self.n_sequences is not None and self.sequence_chunk_rows is not None
        return -(-self.n_sequences // self.sequence_chunk_rows)

    def array_paths(self) -> list[str]:
        """The row arrays (n_rows along their first axis), not `sequences`."""
        return [acts_path(h) for h in self.hooks] + list(META_ARRAYS)


def store_fingerprint(manifest: Manifest) -> dict[str, Any]:
    """A complete store by content: its shape, dtype and the CRC32 of every chunk (which cover
    every stored byte), plus the fingerprints of what it was cached from."""
    assert manifest.complete
    content = [manifest.format_version, manifest.hooks, manifest.d_in, manifest.dtype,
               manifest.n_rows, manifest.chunk_rows, manifest.checksums,
               digests(manifest.fingerprints)]
    return {"kind": "store", "n_rows": manifest.n_rows, "digest": digest_of(content)}


def acts_path(hook: str) -> str:
    return f"{ACTS_GROUP}/{hook}"


def hook_of(array_path: str) -> str | None:
    """The hook an array path holds (`acts/<hook>`), or None for a metadata array."""
    prefix = acts_path("")
    return array_path[len(prefix):] if array_path.startswith(prefix) else None


def create_store(path: str | Path, manifest: Manifest, overwrite: bool = False) -> zarr.Group:
    """Create the group and its (empty) arrays, with `manifest.complete` False."""
    assert not manifest.complete
    check_dtype(manifest.dtype)
    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    create_arrays(group, manifest)
    return group


def create_arrays(group: zarr.Group, manifest: Manifest) -> None:
    """(Re)create a store's empty arrays and its manifest inside an existing group, leaving any
    other files in the folder alone (cache-acts keeps its resume state there)."""
    assert not manifest.complete
    compressors = _compressors(manifest.compression)
    chunk, shard = manifest.chunk_rows, manifest.shard_rows
    for hook in manifest.hooks:
        d = manifest.d_in[hook]
        group.create_array(
            acts_path(hook), shape=(manifest.n_rows, d), chunks=(chunk, d),
            shards=(shard, d) if shard else None, dtype=STORAGE_DTYPES[manifest.dtype],
            compressors=compressors, fill_value=0, overwrite=True,
        )
    for name, dtype in META_ARRAYS.items():
        group.create_array(
            name, shape=(manifest.n_rows,), chunks=(chunk,), shards=(shard,) if shard else None,
            dtype=dtype, compressors=compressors, fill_value=0, overwrite=True,
        )
    write_manifest(group, manifest)


def _compressors(compression: str | None) -> Any:
    if compression in (None, "none"):
        return None
    if compression.startswith("zstd"):
        level = int(compression.split(":", 1)[1]) if ":" in compression else 3
        return zarr.codecs.ZstdCodec(level=level)
    if compression.startswith("blosc"):
        return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    fail(f"unknown compression {compression!r}; choose none, zstd, zstd:LEVEL or blosc")


def write_manifest(group: zarr.Group, manifest: Manifest) -> None:
    group.attrs[MANIFEST_KEY] = manifest.to_dict()


def seal(group: zarr.Group, manifest: Manifest) -> None:
    """Mark a store whose arrays are fully written complete: record every chunk's checksum (read
    back from the arrays) and write the final manifest. For stores written outside cache-acts'
    engine (benchmarks, tests); the engine checksums each chunk as it writes it. `sequences`,
    when written before (`write_sequences`), keeps its checksums."""
    rows = manifest.chunk_rows
    kept = {SEQUENCES: manifest.checksums[SEQUENCES]} if SEQUENCES in manifest.checksums else {}
    manifest.checksums = {**kept, **{
        path: [checksum(group[path][lo:lo + rows]) for lo in range(0, manifest.n_rows, rows)]
        for path in manifest.array_paths()}}
    manifest.complete = True
    write_manifest(group, manifest)


def sequence_chunk_rows(context_size: int) -> int:
    """Sequences per chunk of `sequences`: about SEQUENCE_CHUNK_BYTES."""
    return max(1, SEQUENCE_CHUNK_BYTES // (4 * context_size))


def write_sequences(group: zarr.Group, manifest: Manifest, sequences: np.ndarray) -> None:
    """Write `sequences` [n_sequences, context_size] (any int array, e.g. a memory map; row i is
    sequence i of the token source) as the store's `sequences` array, chunked and sharded as
    `sequence_chunk_rows` and the manifest's sharding say, and record its size and chunk
    checksums in `manifest` (the caller writes the manifest). Rewriting gives the same bytes."""
    n, ctx = sequences.shape
    assert n >= 1 and ctx == manifest.context_size, (sequences.shape, manifest.context_size)
    chunk = sequence_chunk_rows(ctx)
    # shards of whole chunks, at most 128 of them (128 MiB), no bigger than the array needs
    shard = chunk * min(128, -(-n // chunk)) if manifest.shard_rows is not None else None
    array = group.create_array(
        SEQUENCES, shape=(n, ctx), chunks=(chunk, ctx), shards=(shard, ctx) if shard else None,
        dtype=np.dtype("<i4"), compressors=_compressors(manifest.compression), fill_value=0,
        overwrite=True)
    step = shard or chunk
    sums: list[int] = []
    for lo in range(0, n, step):
        block = np.ascontiguousarray(sequences[lo:lo + step], dtype="<i4")
        array[lo:lo + len(block)] = block
        sums += [checksum(block[i:i + chunk]) for i in range(0, len(block), chunk)]
    manifest.n_sequences, manifest.sequence_chunk_rows = n, chunk
    manifest.checksums[SEQUENCES] = sums


@dataclass(frozen=True)
class ChunkSpan:
    """Where one row chunk's raw bytes lie in an uncompressed local store: `nbytes` at
    `offset` of `file` (a format-1 chunk file, or a format-2 shard)."""

    file: Path
    offset: int
    nbytes: int


class Store:
    """Read access to a store (local or remote): the manifest, the arrays, and, for local
    uncompressed stores, chunk spans for memory-mapping."""

    def __init__(self, where: Location, group: zarr.Group, manifest: Manifest):
        self.location = where
        self.path: Path | str = where.local_path or where.url  # as messages name it
        self.group = group
        self.manifest = manifest
        self._shard_index: dict[tuple[str, int], tuple[np.ndarray, int]] = {}
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def hooks(self) -> list[str]:
        return self.manifest.hooks

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    def acts(self, hook: str) -> zarr.Array:
        """A hook's array (opened once: on an object store each opening reads its metadata)."""
        self.check_hook(hook)
        if hook not in self._arrays:
            self._arrays[hook] = self.group[acts_path(hook)]
        return self._arrays[hook]

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    @property
    def has_sequences(self) -> bool:
        """Whether the store keeps its packed token sequences (`cache-acts run` stores do;
        imported stores and stores written before them do not)."""
        return self.manifest.n_sequences is not None

    def read_sequences(self, indices: np.ndarray) -> np.ndarray:
        """Packed sequences [len(indices), context_size] int32 (indices into 0..n_sequences-1),
        each chunk holding one of them read once, whole, and its CRC32 checked (a damaged chunk
        is refused, not shown)."""
        m = self.manifest
        assert m.n_sequences is not None and m.sequence_chunk_rows is not None
        indices = np.asarray(indices, dtype=np.int64)
        assert indices.size == 0 or 0 <= indices.min() and indices.max() < m.n_sequences
        out = np.empty((len(indices), m.context_size), dtype=np.int32)
        rows = m.sequence_chunk_rows
        array = self.group[SEQUENCES]
        for c in np.unique(indices // rows).tolist():
            block = np.asarray(array[c * rows:(c + 1) * rows])
            if checksum(block) != m.checksums[SEQUENCES][c]:
                fail(f"chunk {c} of {SEQUENCES} in store {self.path} does not match its "
                     "checksum: the store is damaged; recreate it with `cache-acts run "
                     "--overwrite`")
            at = indices // rows == c
            out[at] = block[indices[at] - c * rows]
        return out

    def check_hook(self, hook: str) -> None:
        if hook not in self.manifest.hooks:
            fail(
                f"hook {hook!r} is not in store {self.path}; it holds: "
                f"{', '.join(self.manifest.hooks)}"
            )

    def read_rows(self, hook: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one hook as a torch tensor of the logical dtype."""
        return from_storage(self.acts(hook)[start:stop], self.manifest.dtype)

    def check_shapes(self) -> None:
        """Every array exists with the manifest's row count and widths (a store whose arrays
        were padded, cut or swapped must not be read as if it were whole)."""
        m = self.manifest
        for path in m.array_paths():
            hook = hook_of(path)
            want = (m.n_rows, m.d_in[hook]) if hook is not None else (m.n_rows,)
            try:
                shape = tuple(self.group[path].shape)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable array is damage
                fail(f"store {self.path} is damaged: array {path} cannot be opened ({e}); "
                     "recreate it with `cache-acts run --overwrite`")
            if shape != want:
                fail(f"store {self.path} is damaged: array {path} has shape {shape} but the "
                     f"manifest says {want}; recreate it with `cache-acts run --overwrite`")
        if m.n_sequences is not None:
            want = (m.n_sequences, m.context_size)
            try:
                shape = tuple(self.group[SEQUENCES].shape)
            except Exception as e:  # noqa: BLE001 - as above
                fail(f"store {self.path} is damaged: array {SEQUENCES} cannot be opened ({e}); "
                     "recreate it with `cache-acts run --overwrite`")
            if shape != want:
                fail(f"store {self.path} is damaged: array {SEQUENCES} has shape {shape} but "
                     f"the manifest says {want}; recreate it with `cache-acts run --overwrite`")

    def memmappable(self) -> bool:
        """True when chunks are raw little-endian bytes on a local disk."""
        return self.manifest.compression in (None, "none") and self.location.is_local

    def object_file(self, array_path: str, index: int) -> Path:
        """Stored object `index` along rows of a local store's array (`_object_key`)."""
        assert self.location.local_path is not None
        return self.location.local_path / _object_key(array_path, index)

    def chunk_span(self, array_path: str, chunk: int) -> ChunkSpan:
        """Where row chunk `chunk` of an uncompressed local array lies (for memory-mapping)."""
        key, offset, nbytes = self._locate(array_path, chunk)
        assert self.location.local_path is not None
        return ChunkSpan(self.location.local_path / key, offset, nbytes)

    def read_chunk(self, hook: str, chunk: int) -> np.ndarray:
        """The valid rows [<= chunk_rows, d_in] of row chunk `chunk` of an uncompressed store's
        hook, as stored, read with one ranged request (after its shard's index, read once):
        what zarr would return, in a third of its requests on an object store (zarr also reads
        the array's metadata and the index again)."""
        m = self.manifest
        key, offset, nbytes = self._locate(acts_path(hook), chunk)
        data = self.location.read_range(key, offset, offset + nbytes)
        if len(data) != nbytes:
            fail(f"row chunk {chunk} of hook {hook!r} in {self.path} is cut short ({len(data)} "
                 f"of {nbytes} bytes); the store is damaged: recreate it with `cache-acts run "
                 "--overwrite`")
        rows = np.frombuffer(data, dtype=STORAGE_DTYPES[m.dtype]).reshape(m.chunk_rows, -1)
        return rows[:min(m.chunk_rows, m.n_rows - chunk * m.chunk_rows)]

    def _locate(self, array_path: str, chunk: int) -> tuple[str, int, int]:
        """(object key relative to the store, offset, nbytes) of row chunk `chunk` of an
        uncompressed array; refuses (UserError) a missing or damaged object rather than pointing
        at wrong bytes."""
        m = self.manifest
        hook = hook_of(array_path)
        dtype = STORAGE_DTYPES[m.dtype] if hook else np.dtype(META_ARRAYS[array_path])
        nbytes = m.chunk_rows * (m.d_in[hook] if hook else 1) * dtype.itemsize
        shard, inner = divmod(chunk, m.chunks_per_shard)
        key = _object_key(array_path, chunk if m.shard_rows is None else shard)
        where = f"row chunk {chunk} of {array_path} ({self.location.join(key)})"
        if m.shard_rows is not None and (array_path, shard) in self._shard_index:
            index, data_bytes = self._shard_index[(array_path, shard)]
        else:
            try:
                size = self.location.size(key)
            except FileNotFoundError:
                fail(f"{where} is missing: the store at {self.path} is damaged; recreate it "
                     "with `cache-acts run --overwrite`")
            if m.shard_rows is None:
                if size != nbytes:
                    fail(f"chunk file {self.location.join(key)} has {size} bytes, expected "
                         f"{nbytes}: the store at {self.path} is damaged or compressed without "
                         "saying so in its manifest; recreate it with `cache-acts run --overwrite`")
                return key, 0, nbytes
            tail = shards.index_size(m.chunks_per_shard)
            try:
                index = shards.read_index(self.location.read_range(key, max(size - tail, 0), size),
                                          m.chunks_per_shard)
            except shards.ShardIndexError as e:
                fail(f"{where} cannot be located: {e}; the store at {self.path} is damaged; "
                     "recreate it with `cache-acts run --overwrite`")
            data_bytes = size - tail
            self._shard_index[(array_path, shard)] = (index, data_bytes)
        try:
            offset, nbytes = shards.chunk_location(index, inner, nbytes, data_bytes)
        except shards.ShardIndexError as e:
            fail(f"{where} cannot be located: {e}; the store at {self.path} is damaged; "
                 "recreate it with `cache-acts run --overwrite`")
        return key, offset, nbytes


def _object_key(array_path: str, index: int) -> str:
    """Stored object `index` along rows (a chunk in format 1, a shard in format 2) of an array,
    with the default key encoding: <array>/c/<index>[/0 for 2-d arrays]."""
    ndim = 2 if hook_of(array_path) is not None else 1
    return "/".join([array_path, "c", str(index), *["0"] * (ndim - 1)])


def open_store(where: str | Path | Location, require_complete: bool = True) -> Store:
    """Open a store (a local path, or a `shared.storage.Location` for any fsspec URL) for
    reading; refuse one that is missing, foreign or not complete."""
    loc = as_location(where)
    p = loc.local_path or loc.url  # as messages name it
    interrupted = loc.is_local and loc.exists(WORK_DIR)
    if not loc.exists("zarr.json"):
        if interrupted:
            fail(f"store {p} is not complete (its run was interrupted while scattering rows); "
                 "finish it with `cache-acts run ... --resume` or recreate it with --overwrite")
        fail(f"no activation store at {p}; create one with `cache-acts run` or `cache-acts import`")
    try:
        group = zarr.open_group(store=loc.zarr_store(read_only=True), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any unreadable group is the user's to fix
        fail(f"cannot open {p} as a Zarr v3 group ({e}); recreate it with `cache-acts run`")
    raw = group.attrs.get(MANIFEST_KEY)
    if raw is None and interrupted:  # stopped before the group's first manifest
        fail(f"store {p} is not complete (a run was interrupted); finish it with "
             "`cache-acts run ... --resume` or recreate it with --overwrite")
    if raw is None:
        fail(f"{p} is a Zarr group without a manifest; it was not written by cache-acts")
    try:
        manifest = Manifest.from_dict(dict(raw))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        fail(f"the manifest of store {p} is malformed ({e}); recreate the store with "
             "`cache-acts run --overwrite`")
    if manifest.format_version > FORMAT_VERSION:
        fail(
            f"{p} has store format {manifest.format_version}, newer than this version "
            f"({FORMAT_VERSION}); upgrade the package"
        )
    if require_complete and not manifest.complete:
        fail(
            f"store {p} is not complete (a run was interrupted); finish it with "
            "`cache-acts run ... --resume` or recreate it with --overwrite"
        )
    store = Store(loc, group, manifest)
    if manifest.complete:
        store.check_shapes()
    return store
