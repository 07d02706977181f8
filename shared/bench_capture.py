"""Benchmark: model load time and capture() throughput, next to a full forward pass.

    python -m shared.bench_capture [--model SPEC] [--hook HOOK] [--batch 8] [--context 128]

Runs capture() at the hook and a full forward pass (logits) alternately on the same tokens and
prints the median tokens/s of each and their ratio, measured side by side in one run (the
machine is noisy; compare ratios, not absolute numbers across runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shared.embedded import DEFAULT_HOOK
from shared.errors import run_cli
from shared.models import capture, check_context_size, load_model


def bench(spec: str | None, hook: str, batch: int, context: int, repeats: int, device: str) -> None:
    t0 = time.perf_counter()
    loaded = load_model(spec, device=device)
    load_s = time.perf_counter() - t0
    model = loaded.model
    check_context_size(model, context)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, context), generator=gen).to(device)
    capture(model, tokens[:1, :8], [hook])  # warm-up (also the one-off hook probe)

    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    cap, full = [], []
    with torch.no_grad():
        for _ in range(repeats):
            cap.append(timed(lambda: capture(model, tokens, [hook])))
            full.append(timed(lambda: model(tokens, return_type="logits")))
    n = batch * context
    cap_tps, full_tps = n / statistics.median(cap), n / statistics.median(full)
    print(f"model {loaded.spec}: loaded in {load_s:.1f} s on {device}")
    print(f"capture at {hook}, batch {batch} x {context}: {cap_tps:,.0f} tokens/s")
    print(f"full forward (logits), same tokens:        {full_tps:,.0f} tokens/s")
    print(f"ratio capture / full forward: {cap_tps / full_tps:.2f}x")


def app() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--hook", default=DEFAULT_HOOK)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    bench(a.model, a.hook, a.batch, a.context, a.repeats, a.device)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
