"""One TopK / L1 training step: ours vs SAELens vs the bare dense and bare sparse steps, timed side
by side in one run (interleaved rounds, the minimum over rounds; this machine is noisy).

A step is what `Member.step` (train_sae/training/member.py) does less its metrics: forward,
backward, Adam, and the decoder-norm projection (`before/after_optimizer_step`). SAELens' step is
`training_forward_pass`, backward, Adam (as its SAETrainer, less firing statistics and gradient
clipping; its trainer's torch Adam, where ours is the fused one, as Member uses), with `rescale_acts_by_decoder_norm=False`; its TopK is timed with dense and with sparse
(COO, `use_sparse_activations`) activations, and the faster counts.

    bare dense   the five dense matmuls of the step's shapes (as pipelines/bench/train.py)
    bare sparse  the encoder's dense product + topk, then the sparse ops of
                 train_sae/dictionaries/sparse.py as bare torch calls: CSR decode, the SDDMM of
                 the latents' gradient, the transposed CSR products of the W_dec and W_enc
                 gradients (no module, no autograd, no optimizer)
    Adam         torch's Adam step alone over parameters of the SAE's shapes

Goals (CPU): our sparse TopK step >= 2.5x faster than SAELens' at width 16384, and <= 1.2x the
bare sparse step.

    python -m pipelines.bench.topk_step [--d-in 512 --widths 4096,16384,65536 --k 32
        --batch-size 4096 --rounds 3 --threads N --skip-dense-above 16384 --profile WIDTH]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
import warnings
from collections.abc import Callable

import torch

from pipelines.bench.train import bare_dense
from train_sae.dictionaries import TrainProgress, build_sae

try:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
except ImportError:
    TrainStepInput = None

warnings.filterwarnings("ignore", message="Sparse invariant checks")  # SAELens' COO tensors
Step = Callable[[], None]
L1 = 5.0


def ours(arch: str, params: dict, x: torch.Tensor, width: int, sparse: bool = False) -> Step:
    sae = build_sae(arch, x.shape[1], width, params, seed=0)
    sae.sparse_kernels = sparse
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as Member
    step = iter(range(10**9))

    def run() -> None:
        i = next(step)
        out = sae.training_forward(x, TrainProgress(i, 10**6, i * x.shape[0]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return run


def saelens(arch: str, x: torch.Tensor, width: int, **cfg) -> Step:
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(
            d_in=x.shape[1], d_sae=width, rescale_acts_by_decoder_norm=False, **cfg))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=x.shape[1], d_sae=width, **cfg))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    inp = TrainStepInput(sae_in=x, coefficients={"l1": L1}, is_logging_step=False,
                         dead_neuron_mask=torch.zeros(width, dtype=torch.bool),
                         n_training_steps=1000)

    def run() -> None:
        out = sae.training_forward_pass(step_input=inp)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return run


def bare_sparse(x: torch.Tensor, width: int, k: int) -> Step:
    """The least a sparse TopK step computes: sparse.py's ops as bare torch calls."""
    batch, d_in = x.shape
    W_enc = torch.randn(d_in, width) / math.sqrt(d_in)
    b_enc, W_dec = torch.zeros(width), torch.randn(width, d_in)
    g_xhat = torch.randn(batch, d_in)
    crow = torch.arange(0, batch * k + 1, k)  # k entries per row
    rows = torch.arange(batch).repeat_interleave(k)  # [nnz]

    def csr(crow, cols, vals, shape):
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)

    def run() -> None:
        pre = torch.addmm(b_enc, x, W_enc)  # [batch, width] the one dense product
        cols = pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values.reshape(-1)
        vals = pre[rows, cols].relu()  # [nnz]
        csr(crow, cols, vals, (batch, width)) @ W_dec  # decode
        g_vals = torch.sparse.sampled_addmm(  # SDDMM: <g_xhat[row], W_dec[col]>
            csr(crow, cols, torch.zeros_like(vals), (batch, width)), g_xhat, W_dec.T,
            beta=0.0).values()
        order = torch.argsort(cols, stable=True)  # the transposed pattern
        crow_t = torch.zeros(width + 1, dtype=torch.long)
        crow_t[1:] = torch.bincount(cols, minlength=width).cumsum(0)
        csr(crow_t, rows[order], vals[order], (width, batch)) @ g_xhat  # W_dec gradient
        csr(crow_t, rows[order], g_vals[order], (width, batch)) @ x  # W_enc gradient (^T)
    return run


def bare_adam(d_in: int, width: int) -> Step:
    params = [torch.zeros(d_in, width), torch.zeros(width), torch.zeros(width, d_in),
              torch.zeros(d_in)]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)  # ours
    return opt.step


def interleave(fns: dict[str, Step], rounds: int) -> dict[str, float]:
    """Min seconds per call of each function, calls interleaved round by round (one warm-up)."""
    best = dict.fromkeys(fns, math.inf)
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT met"


def bench_topk(x: torch.Tensor, width: int, k: int, rounds: int, dense: bool) -> dict[str, float]:
    fns = {"ours sparse": ours("topk", {"k": k}, x, width, sparse=True)}
    if dense:
        fns["ours dense"] = ours("topk", {"k": k}, x, width)
    if TrainStepInput is not None:
        fns["SAELens dense acts"] = saelens("topk", x, width, k=k)
        fns["SAELens sparse acts"] = saelens("topk", x, width, k=k, use_sparse_activations=True)
    if dense:
        fns["bare dense"] = bare_dense(x, width)
    fns["bare sparse"] = bare_sparse(x, width, k)
    fns["Adam alone"] = bare_adam(x.shape[1], width)
    t = interleave(fns, rounds)
    for name, s in t.items():
        print(f"  {name:<22}{s * 1e3:10.1f} ms")
    sp = t["ours sparse"]
    if TrainStepInput is not None:
        t["SAELens"] = min(t["SAELens dense acts"], t["SAELens sparse acts"])
        print(f"  SAELens (faster) / ours sparse = {t['SAELens'] / sp:.2f}  (goal >= 2.5)")
    bare = t["bare sparse"]
    print(f"  ours sparse / bare sparse = {sp / bare:.2f}  (goal <= 1.2);  "
          f"ours sparse / (bare sparse + Adam) = {sp / (bare + t['Adam alone']):.2f}")
    if dense:
        print(f"  ours dense / bare dense = {t['ours dense'] / t['bare dense']:.2f};  "
              f"ours sparse / ours dense = {sp / t['ours dense']:.2f}")
    del fns
    gc.collect()
    return t


def bench_l1(x: torch.Tensor, width: int, rounds: int) -> None:
    fns = {"ours relu": ours("relu", {"l1_coefficient": L1}, x, width)}
    if TrainStepInput is not None:
        fns["SAELens standard"] = saelens("standard", x, width, l1_coefficient=L1)
    fns["bare dense"] = bare_dense(x, width)
    t = interleave(fns, rounds)
    for name, s in t.items():
        print(f"  {name:<22}{s * 1e3:10.1f} ms")
    line = f"  ours relu / bare dense = {t['ours relu'] / t['bare dense']:.2f}"
    if TrainStepInput is not None:
        line += f";  SAELens standard / ours relu = {t['SAELens standard'] / t['ours relu']:.2f}"
    print(line)
    del fns
    gc.collect()


def profile(x: torch.Tensor, width: int, k: int) -> None:
    """torch.profiler table of our sparse TopK step (3 steps after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    step = ours("topk", {"k": k}, x, width, sparse=True)
    step()
    with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for _ in range(3):
            step()
    print(p.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40,
        max_shapes_column_width=60))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--widths", default="4096,16384,65536")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (minimum taken)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--skip-dense-above", type=int, default=16384,
                   help="no dense variant (ours dense, bare dense, the L1 step) above this width")
    p.add_argument("--goal-width", type=int, default=16384)
    p.add_argument("--profile", type=int, metavar="WIDTH",
                   help="only profile our sparse TopK step at WIDTH")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    widths = [int(w) for w in a.widths.split(",")]
    x = torch.randn(a.batch_size, a.d_in, generator=torch.Generator().manual_seed(0))
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, d_in {a.d_in}, "
          f"k {a.k}, batch {a.batch_size}, ms per step = min of {a.rounds} interleaved rounds")
    if a.profile:
        return profile(x, a.profile, a.k)
    if TrainStepInput is None:
        print("SAELens: skipped (sae_lens does not import; pipelines/bench_train.sh installs it)")
    else:
        import importlib.metadata as md
        print(f"SAELens {md.version('sae-lens')}: its sparse TopK path (COO acts, torch.sparse.mm) "
              "runs on CPU too; both settings timed")

    results = {}
    for width in widths:
        dense = width <= a.skip_dense_above
        print(f"\nTopK step, width {width}" +
              ("" if dense else f" (dense variants skipped: width > {a.skip_dense_above})"))
        results[width] = bench_topk(x, width, a.k, a.rounds, dense)
    for width in widths:
        if width > a.skip_dense_above:
            print(f"\nL1 (relu) step, width {width}: skipped (dense, width > "
                  f"{a.skip_dense_above})")
            continue
        print(f"\nL1 (relu) step, width {width}")
        bench_l1(x, width, a.rounds)

    print("\nSummary")
    both = [w for w in widths if "ours dense" in results[w]]
    wins = [w for w in both if results[w]["ours sparse"] < results[w]["ours dense"]]
    print(f"  sparse vs dense TopK step: sparse faster at widths {wins or 'none'} of {both}")
    t = results.get(a.goal_width)
    if t is None:
        print(f"  goals: width {a.goal_width} not measured")
        return
    if "SAELens" in t:
        r = t["SAELens"] / t["ours sparse"]
        print(f"  goal SAELens / ours sparse >= 2.5 at width {a.goal_width}: {r:.2f} {verdict(r >= 2.5)}")
    r = t["ours sparse"] / t["bare sparse"]
    print(f"  goal ours sparse / bare sparse <= 1.2 at width {a.goal_width}: {r:.2f} {verdict(r <= 1.2)}")


if __name__ == "__main__":
    main()
