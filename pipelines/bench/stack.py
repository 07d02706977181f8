"""Stacked members vs the same members stepped one after another, side by side in one run.

Eight members of one shape, an LR sweep (train_sae/training/stack.py stacks them), each step
timed the two ways over the same batch in interleaved rounds (the minimum over rounds counts;
this machine is noisy): `Member.step` for each member in turn, as `--stack off` trains, against
one `stacked_step` of all eight, as `--stack on` trains. Both include everything a sweep step
does per member (LR schedule, forward, backward, fused Adam, decoder-norm projection, firing
counts), less metric logging. Goal on CPU: stacked no slower than sequential.

    python -m pipelines.bench.stack [--arch relu,topk --d-in 512 --width 4096 --members 8
        --batch-size 4096 --rounds 3 --threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time
from collections.abc import Callable

import torch

from train_sae.dictionaries import TrainProgress
from train_sae.training.member import Member
from train_sae.training.stack import MemberStack, stack_groups
from train_sae.training.sweep import make_member
from train_sae.training.trainer import stacked_step

HOOK = "h"


def members(arch: str, n: int, d_in: int, width: int, batch: int, params: dict) -> list[Member]:
    """n members of one arch and width, an LR sweep (no resampling, no sparse step)."""
    out = []
    for i in range(n):
        cfg = make_member(arch, width, {**params, "lr": 1e-4 * (i + 1), "resample": False}
                          if arch == "relu" else {**params, "lr": 1e-4 * (i + 1)}, batch, 10**6)
        m = Member(dataclasses.replace(cfg, hooks=(HOOK,)), {HOOK: d_in}, 10**6, 0, "cpu", 1e9)
        m.sae.sparse_kernels = False
        out.append(m)
    return out


def timed(step: Callable[[int], None], rounds: int, warmup: int = 1) -> list[float]:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(rounds):
        gc.collect()
        t = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t)
    return times


def bench(arch: str, args: argparse.Namespace) -> tuple[float, float]:
    params = {"k": args.k} if arch == "topk" else {}
    x = torch.randn(args.batch_size, args.d_in)
    batch = {HOOK: x}
    alone = members(arch, args.members, args.d_in, args.width, args.batch_size, params)
    together = members(arch, args.members, args.d_in, args.width, args.batch_size, params)
    assert len(stack_groups(together)) == 1, "the members must share one stack key"
    stack = MemberStack(together)

    def sequential(i: int) -> None:
        progress = TrainProgress(i, 10**6, i * args.batch_size)
        for m in alone:
            m.step(batch, i, progress, {}, False)

    def stacked(i: int) -> None:
        stacked_step(stack, batch, i, TrainProgress(i, 10**6, i * args.batch_size), {}, False)

    seq, stk = [], []
    for _ in range(args.rounds):  # interleaved: both see the same machine state
        seq += timed(sequential, 1)
        stk += timed(stacked, 1)
    return min(seq), min(stk)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="relu,topk")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.members} members, d_in {args.d_in}, width {args.width}, batch "
          f"{args.batch_size}, {args.threads} threads, dense step, min of {args.rounds} rounds")
    for arch in args.arch.split(","):
        seq, stk = bench(arch, args)
        print(f"  {arch:6s} sequential {seq * 1e3:8.1f} ms   stacked {stk * 1e3:8.1f} ms   "
              f"stacked / sequential = {stk / seq:.2f}  (goal <= 1)")


if __name__ == "__main__":
    main()
