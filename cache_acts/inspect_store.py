"""`cache-acts info` and `cache-acts verify`: what a store holds, and whether its data are intact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache_acts.state import RunState, tmp_dir
from shared.errors import fail, first_line
from shared.fingerprint import short
from shared.storage import Location, as_location
from shared.store import STORAGE_DTYPES, Manifest, Store, checksum, hook_of, open_store


def _size_stored(where: Location) -> int:
    if where.local_path is not None:
        return sum(p.stat().st_size for p in where.local_path.rglob("*") if p.is_file())
    where.fs.invalidate_cache()  # this process may have just written it (listings are cached)
    return int(where.fs.du(where.path()))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def info(where: Path | Location, as_json: bool = False) -> str:
    """A human summary of the store at `where` (or its manifest as JSON)."""
    where = as_location(where)
    path = where.local_path or where.url
    if not where.exists("zarr.json"):
        state = RunState.load(tmp_dir(where.local_path)) if where.local_path else None
        if state is None:
            fail(f"no activation store at {path}; create one with `cache-acts run` or "
                 "`cache-acts import`")
        return (f"{path}: an interrupted cache-acts run, still in pass 1 ({state.rows_done:,} "
                "rows scattered); finish it with `cache-acts run ... --resume`")
    store = open_store(where, require_complete=False)
    m = store.manifest
    if as_json:
        return json.dumps(m.to_dict(), indent=2)
    status = "complete" if m.complete else (
        "INCOMPLETE (an interrupted run; finish it with `cache-acts run ... --resume`)")
    dtype = m.dtype + (" (stored as uint16 bits)" if m.dtype == "bfloat16" else "")
    lines = [
        f"store        {path}",
        f"status       {status}",
        f"rows         {m.n_rows:,} in {m.n_chunks} chunks of {m.chunk_rows:,} rows",
        f"objects      {_layout(m)}",
        f"dtype        {dtype}",
        f"compression  {m.compression or 'none'}",
        f"seed         {m.seed}",
    ]
    lines[2:2] = _model_lines(m.model, m.model_info)
    if m.source_files:
        lines.append(f"imported     {len(m.source_files)} file(s): {', '.join(m.source_files[:3])}"
                     + (" ..." if len(m.source_files) > 3 else ""))
    else:
        ds = m.dataset.get("dataset") or "embedded default (Shakespeare)"
        first = m.dataset.get("first_position", 0)
        lines.append(f"dataset      {ds}, context {m.context_size}, "
                     f"BOS {'on' if m.prepend_bos else 'off'}"
                     + (f", positions from {first}" if first else ""))
    lines += _fingerprint_lines(m.fingerprints)
    lines.append(f"{'on disk' if where.is_local else 'stored':<13}{_fmt_bytes(_size_stored(where))}")
    lines.append("hooks")
    for h in m.hooks:
        st = m.stats.get(h)
        extra = f"  mean_norm {st.mean_norm:.4g}" if st else ""
        lines.append(f"  {h}  d_in {m.d_in[h]}{extra}")
    return "\n".join(lines)


def _layout(m: Manifest) -> str:
    """How the chunks are stored: format 2 shards, or a format-1 object per chunk."""
    if m.shard_rows is None:
        return f"{m.n_objects} per array, one per chunk (format {m.format_version})"
    return (f"{m.n_objects} shard(s) per array of {m.shard_rows:,} rows "
            f"(format {m.format_version}, Zarr v3 sharding)")


def _fingerprint_lines(fingerprints: dict) -> list[str]:
    """What the store was cached from, by content (shared.fingerprint), when it says."""
    if not fingerprints:
        return ["content      not recorded (a store written before fingerprints)"]
    parts = [f"model {short(fingerprints.get('model'))}"]
    dataset = fingerprints.get("dataset") or {}
    files = f", {dataset['files']} file(s), {_fmt_bytes(dataset['bytes'])}" if "files" in dataset \
        else ""
    parts.append(f"dataset {short(dataset)} ({dataset.get('kind', '?')}{files})")
    return [f"content      {'; '.join(parts)}"]


def _model_lines(model: str, model_info: dict) -> list[str]:
    """One `model` line, or a `models` block (tag, spec, shape) for a multi-model store."""
    if "models" not in model_info:
        return [f"model        {model}"]
    lines = ["models"]
    for tag, spec in model_info["models"].items():
        facts = model_info.get("per_model", {}).get(tag, {})
        shape = (f"  ({facts['n_layers']} layers, d_model {facts['d_model']}, "
                 f"d_vocab {facts['d_vocab']})" if "n_layers" in facts else "")
        lines.append(f"  {tag}  {spec}{shape}")
    return lines


def verify(where: Path | Location, progress: bool = True) -> str:
    """Check a complete store's arrays against the manifest and every chunk's CRC32.

    Raises UserError (exit 2) for anything wrong; returns a one-line summary when all is well.
    """
    store = open_store(as_location(where), require_complete=True)
    path = store.path
    m = store.manifest
    problems: list[str] = []
    for p in m.array_paths():
        _check_array(store, p, problems)
    if problems:
        fail(f"store {path} is damaged: {problems[0]}" +
             (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "") +
             "; recreate it with --overwrite")
    bad: list[str] = []
    total = len(m.array_paths()) * m.n_chunks
    with tqdm(total=total, unit="chunk", desc="verify", file=sys.stderr, disable=None) as bar:
        for p in m.array_paths():
            arr = store.array(p)
            for c, expected in enumerate(m.checksums[p]):
                try:
                    block = np.asarray(arr[c * m.chunk_rows:(c + 1) * m.chunk_rows])
                    if checksum(block) != expected:
                        bad.append(f"{p} chunk {c} does not match its checksum")
                except (ValueError, RuntimeError, OSError) as e:  # truncated, extended, undecodable
                    bad.append(f"{p} chunk {c} cannot be read ({first_line(e)})")
                bar.update(1)
    if bad:
        fail(f"store {path} is damaged: {len(bad)} of {total} chunks are bad (first: {bad[0]}); "
             "recreate it with --overwrite")
    return f"ok: {path} ({m.n_rows:,} rows, {total} chunks verified)"


def _check_array(store: Store, p: str, problems: list[str]) -> None:
    m = store.manifest
    try:
        arr = store.array(p)
    except KeyError:
        problems.append(f"array {p} is missing")
        return
    hook = hook_of(p)
    shape = (m.n_rows, m.d_in[hook]) if hook else (m.n_rows,)
    if tuple(arr.shape) != shape:
        problems.append(f"array {p} has shape {tuple(arr.shape)}, the manifest says {shape}")
    if hook and arr.dtype != STORAGE_DTYPES[m.dtype]:
        problems.append(f"array {p} has dtype {arr.dtype}, expected {STORAGE_DTYPES[m.dtype]}")
    if len(m.checksums.get(p, [])) != m.n_chunks:
        problems.append(f"array {p} has {len(m.checksums.get(p, []))} checksums for "
                        f"{m.n_chunks} chunks")
