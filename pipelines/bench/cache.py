"""Benchmark: `cache-acts run` end to end against the bare model forward, and store reads against
numpy.fromfile, each pair measured side by side in one process (this machine is noisy).

    python -m pipelines.bench.cache [--tokens 200000] [--batch-size 32] [--repeats 2]

The model is gelu-1l-shaped (1 layer, d_model 512, d_mlp 2048, d_vocab 48262) with random
weights; the tokens are random ids in a pre-tokenized parquet file; the hook is
blocks.0.hook_mlp_out. "bare" is shared.models.capture on the same batches from the same token
stream, stopped after the hook: the least any caching tool must spend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cache_acts.run import RunConfig, run_cache
from shared.models import capture, load_model
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches

GELU_1L = dict(n_layers=1, d_model=512, d_mlp=2048, n_heads=8, d_head=64, d_vocab=48262,
               n_ctx=1024, act_fn="gelu", normalization_type="LN", seed=0)
HOOK = "blocks.0.hook_mlp_out"


def _bare(loaded, spec: TokenSpec, batch_size: int, n_tokens: int) -> float:
    """Seconds for the forward passes alone over the tokens run_cache will cache."""
    t0 = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for tb in iter_token_batches(spec, loaded.tokenizer, batch_size):
            acts = capture(loaded.model, tb.tokens, [HOOK])
            acts[HOOK][tb.keep].cpu()
            done += int(tb.keep.sum())
            if done >= n_tokens:
                break
    return time.perf_counter() - t0


def _read(path: Path, repeats: int) -> tuple[float, float, int]:
    """Best-of-`repeats` (seconds via the Zarr store chunk by chunk, seconds via numpy.fromfile
    of its stored objects, bytes), the two readers interleaved on a warm page cache."""
    store = open_store(path)
    m = store.manifest
    files = [store.object_file(f"acts/{HOOK}", i) for i in range(m.n_objects)]
    nbytes = sum(f.stat().st_size for f in files)
    t_zarr, t_np = [], []
    for _ in range(repeats + 1):  # the first round warms the page cache and is not counted
        t0 = time.perf_counter()
        for start in range(0, m.n_rows, m.chunk_rows):
            store.read_rows(HOOK, start, min(start + m.chunk_rows, m.n_rows))
        t_zarr.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for f in files:
            np.fromfile(f, dtype=np.float32)
        t_np.append(time.perf_counter() - t0)
    return min(t_zarr[1:]), min(t_np[1:]), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp)
        (root / "gelu1l.json").write_text(json.dumps(GELU_1L))
        n_seq = -(-args.tokens // args.context_size) + 1
        ids = np.random.default_rng(0).integers(0, GELU_1L["d_vocab"], (n_seq, args.context_size))
        pq.write_table(pa.table({"ids": ids.tolist()}), root / "tokens.parquet")
        spec = TokenSpec(dataset=str(root / "tokens.parquet"), token_column="ids",
                         context_size=args.context_size, prepend_bos=False)
        model_spec = f"random:{root / 'gelu1l.json'}"
        loaded = load_model(model_spec)
        cfg = RunConfig(out=root / "store", tokens=spec, model=model_spec, hooks=[HOOK],
                        max_tokens=args.tokens, batch_size=args.batch_size)
        _bare(loaded, spec, args.batch_size, args.batch_size * args.context_size)  # warm-up
        bare, full = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both
            bare.append(_bare(loaded, spec, args.batch_size, args.tokens))
            t0 = time.perf_counter()
            run_cache(cfg, overwrite=True, loaded=loaded)
            full.append(time.perf_counter() - t0)
        t_zarr, t_np, nbytes = _read(root / "store", repeats=3)
    tb, tf = min(bare), min(full)
    print(f"tokens {args.tokens:,}  batch {args.batch_size} x {args.context_size}  "
          f"torch threads {torch.get_num_threads()}  (best of {args.repeats})")
    print(f"bare forward (stopped after {HOOK}): {args.tokens / tb:12,.0f} tok/s")
    print(f"cache-acts run end to end:           {args.tokens / tf:12,.0f} tok/s")
    print(f"ratio cache-acts / bare forward:     {tb / tf:12.3f}   (goal >= 0.9)")
    mib = nbytes / 2**20
    print(f"store read (Zarr, {mib:.0f} MiB):        {mib / t_zarr:12,.0f} MiB/s")
    print(f"numpy.fromfile of the same bytes:    {mib / t_np:12,.0f} MiB/s")
    print(f"ratio Zarr read / numpy.fromfile:    {t_np / t_zarr:12.3f}")


if __name__ == "__main__":
    main()
