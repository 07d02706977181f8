"""The activation store: one Zarr v3 group that both stages agree on.

Layout (any Zarr v3 client can read it):

    <store>/
      acts/<hook_name>   (n_rows, d_in)  float32 | float16 | uint16 (= bfloat16 bits)
      token_ids          (n_rows,)       int32   token at that row
      seq_index          (n_rows,)       int64   which packed sequence (or imported file) it came from
      position           (n_rows,)       int32   position inside that sequence (or row in that file)
      attrs["manifest"]  see `Manifest`

All arrays share one row chunking, so row i of every array is the same token. Rows are one
uniformly random permutation of the cached tokens; a contiguous block of rows is a random sample.
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

from shared.errors import fail
from shared.fingerprint import digest_of, digests

# Every chunk gets a file, even an all-zero one, so readers can memory-map chunk files blindly.
# (Zarr's runtime config is per process and not stored in the arrays, so it is set here, where
# every writer of a store imports it.)
zarr.config.set({"array.write_empty_chunks": True})

FORMAT_VERSION = 1
MANIFEST_KEY = "manifest"
# where `cache-acts` keeps its bucket files and resume state while a store is being written
WORK_DIR = ".cache-acts-tmp"
ACTS_GROUP = "acts"
META_ARRAYS = {"token_ids": np.int32, "seq_index": np.int64, "position": np.int32}

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

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def array_paths(self) -> list[str]:
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
    chunk = manifest.chunk_rows
    for hook in manifest.hooks:
        group.create_array(
            acts_path(hook),
            shape=(manifest.n_rows, manifest.d_in[hook]),
            chunks=(chunk, manifest.d_in[hook]),
            dtype=STORAGE_DTYPES[manifest.dtype],
            compressors=compressors,
            fill_value=0,
            overwrite=True,
        )
    for name, dtype in META_ARRAYS.items():
        group.create_array(
            name, shape=(manifest.n_rows,), chunks=(chunk,), dtype=dtype,
            compressors=compressors, fill_value=0, overwrite=True,
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
    engine (benchmarks, tests); the engine checksums each chunk as it writes it."""
    rows = manifest.chunk_rows
    manifest.checksums = {
        path: [checksum(group[path][lo:lo + rows]) for lo in range(0, manifest.n_rows, rows)]
        for path in manifest.array_paths()}
    manifest.complete = True
    write_manifest(group, manifest)


class Store:
    """Read access to a store: the manifest, the arrays, and chunk files for memory-mapping."""

    def __init__(self, path: str | Path, group: zarr.Group, manifest: Manifest):
        self.path = Path(path)
        self.group = group
        self.manifest = manifest

    @property
    def hooks(self) -> list[str]:
        return self.manifest.hooks

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    def acts(self, hook: str) -> zarr.Array:
        self.check_hook(hook)
        return self.group[acts_path(hook)]

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

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
            hook = path[len(ACTS_GROUP) + 1:] if path.startswith(ACTS_GROUP + "/") else None
            want = (m.n_rows, m.d_in[hook]) if hook is not None else (m.n_rows,)
            try:
                shape = tuple(self.group[path].shape)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable array is damage
                fail(f"store {self.path} is damaged: array {path} cannot be opened ({e}); "
                     "recreate it with `cache-acts run --overwrite`")
            if shape != want:
                fail(f"store {self.path} is damaged: array {path} has shape {shape} but the "
                     f"manifest says {want}; recreate it with `cache-acts run --overwrite`")

    def memmappable(self) -> bool:
        """True when chunk files are raw little-endian bytes on a local disk."""
        return self.manifest.compression in (None, "none") and self.path.exists()

    def chunk_file(self, array_path: str, chunk_index: int) -> Path:
        """Where chunk `chunk_index` (along rows) of an array lives, with the default key encoding."""
        ndim = len(self.group[array_path].shape)
        parts = [str(chunk_index)] + ["0"] * (ndim - 1)
        return self.path / array_path / "c" / Path(*parts)


def open_store(path: str | Path, require_complete: bool = True) -> Store:
    """Open a store for reading; refuse one that is missing, foreign or not complete."""
    p = Path(path)
    if not (p / "zarr.json").exists():
        if (p / WORK_DIR).is_dir():
            fail(f"store {p} is not complete (its run was interrupted while scattering rows); "
                 "finish it with `cache-acts run ... --resume` or recreate it with --overwrite")
        fail(f"no activation store at {p}; create one with `cache-acts run` or `cache-acts import`")
    try:
        group = zarr.open_group(str(p), mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001 - any unreadable group is the user's to fix
        fail(f"cannot open {p} as a Zarr v3 group ({e}); recreate it with `cache-acts run`")
    raw = group.attrs.get(MANIFEST_KEY)
    if raw is None and (p / WORK_DIR).is_dir():  # stopped before the group's first manifest
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
    store = Store(p, group, manifest)
    if manifest.complete:
        store.check_shapes()
    return store
