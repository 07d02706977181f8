"""Benchmark: ActivationLoader throughput against plain `numpy.fromfile` of the same chunk files.

Both are timed in one run, in alternating blocks of whole passes over the store, so machine noise
hits them alike; the figure that matters is the ratio (goal: loader >= 0.7 x fromfile).
`fromfile` reads each chunk file front to back, `batch_size` rows per read into a fresh array
(the same output size as a loader batch), and does nothing else; the loader does everything a
training run gets: seeded chunk order, batches cut across chunks, float32 widening, scaling,
hand-over from its background thread. Consumers do no work with the batches.

    python -m pipelines.bench.loader --rows 524288 --d-in 512 --seconds 20
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from shared.errors import fail, run_cli
from shared.store import (
    STORAGE_DTYPES,
    HookStats,
    Manifest,
    Store,
    acts_path,
    create_store,
    open_store,
    seal,
)
from train_sae.training.loader import ActivationLoader, ChunkVerifier


def measure(store_path: str | Path, batch_size: int = 4096, seconds: float = 10.0,
            block_bytes: int = 256 << 20) -> dict:
    """Rows per second of the loader and of `numpy.fromfile` over the same (uncompressed) store.

    Blocks alternate (fromfile over every chunk file of every hook E times, then one loader
    streaming E epochs, E chosen so a block reads about `block_bytes`) until `seconds` have been
    spent in total; rates are total rows over total time for each. A training run builds one
    loader and streams from it, so each block builds one (its start-up is counted once a block).
    A loader checks each chunk (CRC32, NaN/inf) on its first read; that one-off cost is timed
    separately (`verify_s_per_pass`) and the blocks measure the steady state after it.
    """
    store = open_store(store_path)
    m = store.manifest
    if not store.memmappable():
        fail(f"{store_path} is compressed; the benchmark compares raw chunk-file reads")
    n_batches = m.n_rows // batch_size  # one epoch, whole batches
    if n_batches < 1:
        fail(f"the store has {m.n_rows} rows, fewer than one batch of {batch_size}")
    dtype = np.dtype("<f4") if m.dtype == "float32" else np.dtype("<u2")
    row_bytes = sum(m.d_in.values()) * dtype.itemsize
    epochs = max(1, block_bytes // (m.n_rows * row_bytes))
    verified = ChunkVerifier(store)
    verify_s = _verify_pass(store, verified)
    spent = {"fromfile": 0.0, "loader": 0.0}
    rows = {"fromfile": 0, "loader": 0}
    blocks = 0
    while blocks < 2 or sum(spent.values()) < seconds:
        t0 = time.perf_counter()
        for _ in range(epochs):
            for hook in m.hooks:
                _fromfile_pass(store, hook, dtype, batch_size)
        spent["fromfile"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        loader = ActivationLoader(store, m.hooks, batch_size, epochs * n_batches, seed=blocks)
        loader.verifier = verified  # steady state: first-read checks are timed on their own
        for _batch in loader:
            pass
        spent["loader"] += time.perf_counter() - t0
        rows["fromfile"] += epochs * m.n_rows
        rows["loader"] += epochs * n_batches * batch_size
        blocks += 1
    rates = {k: rows[k] / spent[k] for k in rows}
    return {
        # what a loader adds on its first pass over each chunk (CRC32 + NaN/inf check), against
        # the time of one loader pass
        "verify_s_per_pass": verify_s,
        "verify_over_loader_pass": verify_s / (m.n_rows / rates["loader"]),
        "store_bytes": m.n_rows * row_bytes,
        "passes": blocks * epochs,
        "loader_rows_per_s": rates["loader"],
        "fromfile_rows_per_s": rates["fromfile"],
        "loader_gb_per_s": rates["loader"] * row_bytes / 1e9,
        "fromfile_gb_per_s": rates["fromfile"] * row_bytes / 1e9,
        "ratio": rates["loader"] / rates["fromfile"],
    }


def _verify_pass(store: Store, verifier: ChunkVerifier) -> float:
    """Seconds to check every chunk of every hook once, as a loader does on first reads."""
    m = store.manifest
    t0 = time.perf_counter()
    for hook in m.hooks:
        for chunk in range(m.n_chunks):
            valid = min(m.chunk_rows, m.n_rows - chunk * m.chunk_rows)
            span = store.chunk_span(acts_path(hook), chunk)
            rows = np.memmap(span.file, dtype=STORAGE_DTYPES[m.dtype], mode="r",
                             offset=span.offset, shape=(valid, m.d_in[hook]))
            verifier.check(hook, chunk, rows)
    return time.perf_counter() - t0


def _fromfile_pass(store: Store, hook: str, dtype: np.dtype, batch_size: int) -> None:
    """Read every valid row of one hook, chunk by chunk, `batch_size` rows per read."""
    m = store.manifest
    d_in = m.d_in[hook]
    for chunk in range(m.n_chunks):
        valid = min(m.chunk_rows, m.n_rows - chunk * m.chunk_rows)
        span = store.chunk_span(acts_path(hook), chunk)
        with open(span.file, "rb") as f:
            f.seek(span.offset)
            for lo in range(0, valid, batch_size):
                np.fromfile(f, dtype=dtype, count=min(batch_size, valid - lo) * d_in)


def write_bench_store(path: Path, n_rows: int, d_in: int, chunk_rows: int) -> None:
    """A complete float32 store of Gaussian rows, written one chunk at a time."""
    manifest = Manifest(
        model="bench", hooks=["bench"], d_in={"bench": d_in}, dtype="float32", n_rows=n_rows,
        context_size=1, seed=0, chunk_rows=chunk_rows,
    )
    group = create_store(path, manifest)
    rng = np.random.default_rng(0)
    array = group[acts_path("bench")]
    norm_sum = 0.0
    for lo in range(0, n_rows, chunk_rows):
        x = rng.standard_normal((min(chunk_rows, n_rows - lo), d_in), dtype=np.float32)
        array[lo : lo + len(x)] = x
        norm_sum += float(np.linalg.norm(x.astype(np.float64), axis=1).sum())
    manifest.stats["bench"] = HookStats(mean=[0.0] * d_in, mean_norm=norm_sum / n_rows)
    seal(group, manifest)


app = typer.Typer(add_completion=False)


@app.command()
def bench(
    rows: Annotated[int, typer.Option(help="rows in the generated store")] = 524_288,
    d_in: Annotated[int, typer.Option(help="activation width")] = 512,
    chunk_rows: Annotated[int, typer.Option(help="rows per chunk file")] = 16_384,
    batch_size: Annotated[int, typer.Option(help="loader batch size")] = 4096,
    seconds: Annotated[float, typer.Option(help="total time to spend timing")] = 20.0,
    workdir: Annotated[Path | None, typer.Option(help="where to write the store (a temp dir)")] = None,
) -> None:
    """Write a float32 store and print loader vs numpy.fromfile read rates and their ratio."""
    if rows < batch_size or d_in < 1 or chunk_rows < 1:
        fail("need rows >= batch size, d_in >= 1 and chunk_rows >= 1")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "bench.zarr"
        t0 = time.perf_counter()
        write_bench_store(path, rows, d_in, chunk_rows)
        print(f"wrote {rows} x {d_in} float32 ({rows * d_in * 4 / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t0:.1f}s; it fits in the page cache, so both read from RAM")
        r = measure(path, batch_size=batch_size, seconds=seconds)
    print(f"passes over the store: {r['passes']} each")
    print(f"numpy.fromfile : {r['fromfile_rows_per_s']:12,.0f} rows/s  {r['fromfile_gb_per_s']:.2f} GB/s")
    print(f"ActivationLoader: {r['loader_rows_per_s']:11,.0f} rows/s  {r['loader_gb_per_s']:.2f} GB/s")
    print(f"ratio loader / fromfile: {r['ratio']:.2f} (goal >= 0.7)")
    print(f"checksum + NaN/inf check of every chunk: {r['verify_s_per_pass']:.3f}s, "
          f"{r['verify_over_loader_pass']:.2f} x one loader pass (paid once per loader, on the "
          "first read of each chunk)")


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
