"""Training-side benchmark: ratios measured side by side in one run (this machine is noisy).

(a) loader rows/s vs numpy.fromfile of the same chunk files (pipelines.bench.loader.measure);
(b) one TopK and one L1 (relu) training step (forward, backward, Adam) vs the five bare matmuls
    of the same shapes (encoder and decoder forward, the decoder's input gradient, both weight
    gradients);
(c) an 8-member sweep in one pass vs the same 8 members trained by 8 separate single runs
    (goal: <= 0.8 of their total time), at --width and at width 64. One pass saves the loading
    and per-run setup, not the SAE matmuls, so the ratio nears 1 where matmuls dominate.

    python -m pipelines.bench.train [--d-in 256 --width 1024 --batch-size 1024 --rows 16384 --device cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipelines.bench.loader import measure
from train_sae.dictionaries import build_sae
from train_sae.dictionaries.base import TrainProgress
from train_sae.training.config import TrainConfig
from train_sae.training.sweep import make_member
from train_sae.training.trainer import prepare, resolve_device, train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # tests/synthetic.py
from synthetic import write_synthetic_store  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _alternate(fns: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_step(arch: str, params: dict, d_in: int, width: int, batch: int, device: str,
               rounds: int) -> dict[str, float]:
    """(b): seconds per training step vs per set of bare matmuls of the same shapes."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen).to(device)  # [batch, d_in]
    sae = build_sae(arch, d_in, width, params, seed=0).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    progress = TrainProgress(step=1000, total_steps=10_000, tokens_seen=0)

    def step() -> None:
        out = sae.training_forward(x, progress)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()

    t = _alternate({"step": step, "bare": bare_dense(x, width)}, rounds, device)
    return {"step_s": t["step"], "bare_matmuls_s": t["bare"], "ratio": t["step"] / t["bare"]}


def bare_dense(x: torch.Tensor, width: int) -> Callable[[], None]:
    """The five matmuls of a dense step of these shapes, on x's device."""
    batch, d_in = x.shape
    W_enc = torch.randn(d_in, width, device=x.device)  # [d_in, d_sae]
    W_dec = torch.randn(width, d_in, device=x.device)  # [d_sae, d_in]
    acts = torch.randn(batch, width, device=x.device)  # [batch, d_sae]
    g_xhat = torch.randn(batch, d_in, device=x.device)  # [batch, d_in]

    def bare() -> None:
        x @ W_enc  # encoder forward
        acts @ W_dec  # decoder forward
        g_acts = g_xhat @ W_dec.T  # gradient into the latents
        acts.T @ g_xhat  # W_dec gradient
        x.T @ g_acts  # W_enc gradient
    return bare


EIGHT = [("topk", {"k": 8}), ("topk", {"k": 16}), ("topk", {"k": 32}), ("topk", {"k": 64}),
         ("relu", {"l1_coefficient": 1.0, "resample": False}),
         ("relu", {"l1_coefficient": 3.0, "resample": False}),
         ("april", {"l1_coefficient": 1.0}), ("april", {"l1_coefficient": 3.0})]


def bench_sweep(store: Path, work: Path, width: int, batch: int, device: str, rounds: int
                ) -> dict[str, float]:
    """(c): one pass with 8 members vs 8 single-member runs over the same batches."""
    counter = iter(range(10**6))

    def run(members_given: list[tuple[str, dict]]) -> None:
        cfg = TrainConfig(store=str(store), out=str(work / f"w{width}-run{next(counter)}"),
                          batch_size=batch, device=device, log_every=10**9)
        plan = prepare(cfg)
        members = [make_member(a, width, dict(p), batch, plan.total_steps)
                   for a, p in members_given]
        with contextlib.redirect_stderr(io.StringIO()):  # no progress bars in the report
            train(cfg, plan, members)

    def one_pass() -> None:
        run(EIGHT)

    def separate() -> None:
        for member in EIGHT:
            run([member])

    t = _alternate({"one_pass": one_pass, "separate": separate}, rounds, device)
    return {"one_pass_s": t["one_pass"], "separate_s": t["separate"],
            "ratio": t["one_pass"] / t["separate"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--rows", type=int, default=16384, help="store rows (= tokens of each run)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (median)")
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default); 1 is steadiest on shared cores")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        x = torch.randn(a.rows, a.d_in, generator=torch.Generator().manual_seed(0))
        write_synthetic_store(store, x, chunk_rows=min(a.rows, 8192))
        del x
        print(f"device {device}, threads {torch.get_num_threads()}, d_in {a.d_in}, width "
              f"{a.width}, batch {a.batch_size}, store {a.rows} rows "
              f"({a.rows * a.d_in * 4 / 1e6:.0f} MB, page-cached)")
        r = measure(store, batch_size=a.batch_size, seconds=a.loader_seconds)
        print(f"(a) loader {r['loader_rows_per_s']:,.0f} rows/s vs numpy.fromfile "
              f"{r['fromfile_rows_per_s']:,.0f} rows/s: ratio {r['ratio']:.2f}")
        print(f"(a) chunk checks (CRC32 + NaN/inf, first read of each chunk): "
              f"{r['verify_s_per_pass'] * 1e3:.1f} ms per pass over the store, "
              f"{r['verify_over_loader_pass']:.2f} x one loader pass")
        for arch, params in (("topk", {"k": 32}), ("relu", {"l1_coefficient": 1.0})):
            s = bench_step(arch, params, a.d_in, a.width, a.batch_size, device, a.rounds * 5)
            print(f"(b) {arch} training step {s['step_s'] * 1e3:.2f} ms vs bare matmuls "
                  f"{s['bare_matmuls_s'] * 1e3:.2f} ms: ratio {s['ratio']:.2f}")
        # at --width the SAE matmuls dominate on a CPU; at width 64 loading and per-run setup do
        for width in (a.width, 64):
            c = bench_sweep(store, Path(tmp), width, a.batch_size, device, a.rounds)
            print(f"(c) width {width}: 8-member sweep in one pass {c['one_pass_s']:.2f} s vs 8 "
                  f"separate runs {c['separate_s']:.2f} s: ratio {c['ratio']:.2f} (goal <= 0.8)")


if __name__ == "__main__":
    main()
