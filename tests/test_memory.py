"""Peak memory estimates (train_sae/training/memory.py) against what a step really allocates, and
the start-up check of `train-sae sweep`:

- the estimate of one member (weights + gradients + Adam state + its step's peak) lies within
  0.7x-1.5x of the peak the torch CPU allocator records over real training steps, for dense and
  sparse TopK, ReLU, BatchTopK, JumpReLU, Gated, Matryoshka, a transcoder and crosscoders; and
  its step peak is at least what autograd saves for backward;
- a sweep too large for the device refuses before training with one line (need, what is
  available, the fixes) and leaves --out absent, in one process and on one of two torchrun ranks;
- a sweep that fits prints each member's memory (its weights the exact bytes of its parameters)
  and its peak against what is available; a large sweep lists its largest members only.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke
from synthetic import make_sparse_data, write_synthetic_store
from torch.profiler import ProfilerActivity, profile

from shared.errors import UserError
from train_sae.cli import main
from train_sae.dictionaries import sparse as sparse_module
from train_sae.dictionaries.base import TrainProgress
from train_sae.training import memory
from train_sae.training.config import MemberConfig
from train_sae.training.member import Member, build_model
from train_sae.training.memory import MemberMemory, SweepMemory, human, member_memory

BIN = Path(sys.executable).parent


# --- the estimate against the allocator ---------------------------------------------------------
def allocator_peak(fn) -> int:
    """The most bytes the torch CPU allocator had handed out at once while `fn` ran, counted
    from zero at its start (its own record of every allocation and free: the CPU's
    torch.cuda.max_memory_allocated)."""
    gc.collect()  # no garbage from before freed in the window
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def held_bytes(m: Member) -> int:
    """What a member holds between steps: parameters, gradients, optimizer state, buffers,
    firing counters."""
    def size(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    params = list(m.sae.parameters())
    state = [v for s in m.opt.state.values() for v in s.values() if torch.is_tensor(v)]
    counters = [d.counts for d in (m.log_density, m.dead_density, m.final_density)]
    return (size(params) + size(p.grad for p in params if p.grad is not None) + size(state)
            + size(m.sae.buffers()) + size(counters))


def saved_bytes(m: Member, batch: dict[str, torch.Tensor]) -> int:
    """The bytes autograd saves for backward in one training forward (parameters and inputs
    left out): a lower bound of what the step holds at its peak."""
    skip = {p.untyped_storage().data_ptr() for p in m.sae.parameters()}
    skip |= {x.untyped_storage().data_ptr() for x in batch.values()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = m.sae.inputs(batch)
    y = x if m.cfg.outputs == m.hooks else m.sae.targets(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.sae.training_forward(x, TrainProgress(0, 100, 0), y)
    return sum(seen.values())


D_IN, WIDTH, ROWS = 128, 4096, 512  # a wide dictionary, as SAEs are: [rows, width] dominates
KINDS = [  # arch, params, sparse step, input hooks, output width (a transcoder's)
    ("topk", {"k": 16}, False, 1, None),
    ("topk", {"k": 16}, True, 1, None),
    ("relu", {}, False, 1, None),
    ("transcoder", {"k": 16}, False, 1, 256),
    ("batchtopk", {"k": 16}, True, 1, None),
    ("jumprelu", {}, False, 1, None),
    ("gated", {}, False, 1, None),
    ("matryoshka_batchtopk", {"k": 16}, False, 1, None),
    ("crosscoder", {}, False, 2, None),
]


@pytest.mark.parametrize("arch, params, sparse, n_hooks, d_out", KINDS,
                         ids=[f"{k[0]}-{'sparse' if k[2] else 'dense'}" for k in KINDS])
def test_estimate_is_within_bounds_of_the_measured_peak(arch, params, sparse, n_hooks, d_out):
    hooks = tuple(f"h{i}" for i in range(n_hooks))
    dims = dict.fromkeys(hooks, D_IN)
    if d_out:
        dims["y"] = d_out
    cfg = MemberConfig(arch=arch, d_sae=WIDTH, params=params, hooks=hooks,
                       out_hooks=("y",) if d_out else (), name="m")
    gen = torch.Generator().manual_seed(0)
    batch = {h: torch.randn(ROWS, d, generator=gen) for h, d in dims.items()}
    getattr(sparse_module, "_SCRATCH", {}).clear()  # the sparse step's buffer: made in the window
    box: dict[str, Member] = {}

    def train() -> None:  # build the member and train it 3 steps, as the trainer does
        torch.manual_seed(0)
        m = box["m"] = Member(cfg, dims, 100, 0, "cpu", 1e3)
        m.sae.sparse_kernels = sparse and m.sae.supports_sparse
        for step in range(3):
            if hasattr(m.sae, "tokens_since_fired"):  # every latent dead: AuxK's worst case
                m.sae.tokens_since_fired.fill_(10**9)
            m.step(batch, step, TrainProgress(step, 100, step * ROWS), {}, log=True)

    peak = allocator_peak(train)
    m = box["m"]
    est = member_memory(m.sae, "m", ROWS, "cpu", m.opt)
    assert est.kind == ("sparse" if sparse else "dense")
    held = held_bytes(m)
    assert est.held == held  # weights, gradients, Adam state and counters: exact
    assert 0.7 <= est.total / peak <= 1.5, (est.total / peak, est, peak)
    assert 0.7 <= est.step / (peak - held) <= 1.5, (est.step / (peak - held), est, peak - held)
    assert est.step >= saved_bytes(m, batch)


def test_weights_are_the_exact_bytes_of_parameters_and_buffers():
    cfg = MemberConfig(arch="topk", d_sae=64, params={"k": 4}, hooks=("x",), name="t")
    model = build_model(cfg, {"x": 16}, 0)
    est = member_memory(model, "t", 32, "cuda")
    params = sum(p.numel() * 4 for p in model.parameters())
    assert est.weights == params + 64 * 8  # the float32 parameters and tokens_since_fired
    assert est.grads == params and est.adam == 2 * params + 4 * 4  # and 4 step counts
    assert est.counters == 3 * 64 * 8


# --- the start-up check through the CLI -----------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = make_sparse_data(2048, 8, 16, 2, seed=0)
    path = tmp_path_factory.mktemp("mem") / "store"
    write_synthetic_store(path, x, chunk_rows=512)
    return path


def sweep_args(store: Path, out: Path) -> list:
    return ["sweep", "--store", store, "--out", out, "--batch-size", 128, "--device", "cpu",
            "--arch", "topk,relu", "--width", "16,32", "--k", 2, "--tokens", 1024]


def test_a_sweep_too_large_refuses_before_training_with_one_line(store, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: 100_000)
    out = tmp_path / "out"
    code, stdout, err = invoke(main, "train-sae", monkeypatch, capsys, *sweep_args(store, out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: the sweep would not fit in cpu memory: it needs about ")
    assert "4 member(s) hold" in line and "the largest step adds" in line
    built = sum(member_memory(build_model(MemberConfig(arch, w, p, hooks=("x",)), {"x": 8},
                                          0), "", 1, "cpu").weights
                for w in (16, 32) for arch, p in (("topk", {"k": 2}), ("relu", {})))
    # what is free, and what the built members hold already
    assert f" but {human(100_000 + built)} is available; " in line
    for fix in ("torchrun --nproc-per-node", "--batch-size", "fewer or smaller members"):
        assert fix in line
    assert stdout == ""
    assert not out.exists(), "nothing is written for a sweep that does not fit"


def test_a_sweep_that_fits_prints_each_member(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 40)
    out = tmp_path / "out"
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, *sweep_args(store, out))
    assert code == 0, err
    lines = err.splitlines()
    first = lines.index("memory per member (weights + gradients + Adam state + the peak of one "
                        "step):")
    members = lines[first + 1:first + 5]
    assert len(members) == 4 and all(x.startswith("  ") for x in members)
    relu = next(x for x in members if x.startswith("  relu-w16-"))
    cfg = MemberConfig(arch="relu", d_sae=16, hooks=("synthetic",))
    params = sum(p.numel() * 4 for p in build_model(cfg, {"synthetic": 8}, 0).parameters())
    assert f": weights {human(params)} + grads {human(params)} + Adam {human(2 * params)} + " \
           "dense step peak " in relu
    total = lines[first + 5]
    assert total.startswith("peak memory on cpu: about ") and "4 member(s) hold" in total
    assert total.endswith("; 1.0 TiB available")
    assert lines[first + 6].startswith("training 4 member(s)")
    assert (out / "sweep.json").exists()


# --- what is printed for a large sweep, and the CUDA fixes -------------------------------------
def fake(name: str, step: int, kind: str = "dense", sparse_possible: bool = False
         ) -> MemberMemory:
    return MemberMemory(name, 1000, 1000, 2000, step, kind, 0, sparse_possible)


def test_a_large_sweep_lists_its_largest_members():
    members = [fake(f"m{i}", 10_000 * i) for i in range(12)]
    lines = memory.describe([SweepMemory("cuda:0", members, 5000, 0, 2000, 10**9, 10**10)])
    assert [x.split(":")[0].strip() for x in lines[1:6]] == ["m11", "m10", "m9", "m8", "m7"]
    assert lines[6].startswith("  ... and 7 more of at most ")
    assert lines[7].startswith("peak memory on cuda:0: about ")
    assert "the loader's pinned buffers take 2.0 KiB of host memory" in lines[7]


def test_the_fixes_name_the_sparse_step_when_a_dense_topk_step_dominates():
    r = SweepMemory("cuda:0", [fake("topk-w64", 10**9, sparse_possible=True), fake("relu", 10)],
                    0, 0, free=10**6)
    assert not memory.fits(r)
    with pytest.raises(UserError) as e:
        memory.check_fits(r)
    assert "--kernels torch (the dense step of topk-w64, mostly [batch, width]" in str(e.value)
    r.members = [fake("relu", 10**9)]
    with pytest.raises(UserError) as e:
        memory.check_fits(r)
    assert "--kernels torch" not in str(e.value)
    memory.check_fits(SweepMemory("cpu", [fake("a", 10**9)], 0, 0, free=None))  # unknown: passes


# --- under torchrun: one rank refuses, both stop with one line -------------------------------------
REFUSE_SCRIPT = """
import os, sys
from train_sae.training import memory
if os.environ["RANK"] == "1":
    memory.available_memory = lambda device: 100_000
from train_sae.cli import main
sys.argv = ["train-sae", *sys.argv[1:]]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refusal_on_one_rank_stops_every_rank(store, tmp_path):
    script = tmp_path / "refuse.py"
    script.write_text(REFUSE_SCRIPT)
    out = tmp_path / "out"
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--tee", "3", str(script),
           *map(str, sweep_args(store, out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    errors = {r: [x[x.index(f"[default{r}]:error:"):] for x in output.splitlines()
                  if f"[default{r}]:error:" in x] for r in (0, 1)}
    assert len(errors[1]) == 1, output
    own = errors[1][0].removeprefix("[default1]:error: ")
    assert own.startswith("the sweep would not fit in rank 1's cpu memory: it needs about ")
    assert errors[0] == [f"[default0]:error: rank 1 of 2 failed: {own} (rank 0 stopped with it)"]
    assert "memory per member" not in output and "training 4 member(s)" not in output
    assert output.count("exitcode  : 2") == 2, output
    assert not out.exists()
