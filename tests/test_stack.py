"""Stacked members (train_sae/training/stack.py): members differing only in optimizer settings and
loss weights train as one batched module, to the results of training them one by one."""

import json

import pytest
from synthetic import make_sparse_data, write_synthetic_store

from train_sae.training.config import TrainConfig
from train_sae.training.member import Member
from train_sae.training.stack import stack_groups
from train_sae.training.sweep import make_member
from train_sae.training.trainer import bind_hooks, prepare, train

BATCH = 128


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = make_sparse_data(4096, 16, 32, 2, seed=0)
    path = tmp_path_factory.mktemp("store") / "store"
    write_synthetic_store(path, x, chunk_rows=512)
    return path


# an LR sweep and an L1 sweep of ReLU SAEs (with resampling), and an LR / AuxK-weight / k sweep
# of TopK SAEs whose latents die early (so AuxK acts), plus a member that stacks with nobody
MEMBERS = [
    ("relu", 128, {"l1_coefficient": 3.0, "lr": 5e-3}),
    ("relu", 128, {"l1_coefficient": 3.0, "lr": 2e-3}),
    ("relu", 128, {"l1_coefficient": 6.0, "lr": 5e-3, "grad_clip": 0.0, "resample": False}),
    ("topk", 64, {"k": 4, "lr": 5e-3, "dead_tokens_threshold": 256}),
    ("topk", 64, {"k": 4, "lr": 1e-3, "dead_tokens_threshold": 256, "aux_coefficient": 0.5}),
    ("topk", 64, {"k": 8, "lr": 5e-3, "dead_tokens_threshold": 256}),
    ("topk", 32, {"k": 4, "lr": 5e-3}),
]


def run(store, out, stack: str, members=MEMBERS, tokens=16384, **kw):
    cfg = TrainConfig(store=str(store), out=str(out), batch_size=BATCH, tokens=tokens,
                      log_every=16, device="cpu", kernels="dense", stack=stack, progress=False,
                      **kw)
    plan = prepare(cfg)
    cfgs = [make_member(arch, width, dict(given), BATCH, plan.total_steps)
            for arch, width, given in members]
    return train(cfg, plan, cfgs)


def weights(folder):
    return (folder / "sae_weights.safetensors").read_bytes()


def crash_at(step, train_sweep):
    """Run `train_sweep` with a crash right after its checkpoint at `step`."""
    import train_sae.training.trainer as trainer

    real = trainer.SweepRun.checkpoint

    def crash_after(self, done):
        real(self, done)
        if done == step:
            raise KeyboardInterrupt

    trainer.SweepRun.checkpoint = crash_after
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sweep()
    finally:
        trainer.SweepRun.checkpoint = real


def test_groups_stack_only_what_may_differ(store):
    cfg = TrainConfig(store=str(store), out="unused", batch_size=BATCH, device="cpu",
                      kernels="dense")
    plan = prepare(cfg)

    def member(arch, width, given):
        cfg = bind_hooks(make_member(arch, width, dict(given), BATCH, plan.total_steps), plan)
        return Member(cfg, plan.dims, plan.total_steps, 0, "cpu", 1e3)

    members = [member(*m) for m in MEMBERS]
    groups = [[m.name for m in g] for g in stack_groups(members)]
    assert [len(g) for g in groups] == [3, 3, 1]
    # another AuxK threshold, or the sparse step, does not stack
    other = member("topk", 64, {"k": 4, "lr": 5e-3})
    assert [len(g) for g in stack_groups([members[3], other])] == [1, 1]
    members[4].sae.sparse_kernels = True
    assert [len(g) for g in stack_groups(members[3:5])] == [1, 1]


def test_stacked_sweep_equals_members_trained_one_by_one(store, tmp_path):
    alone = run(store, tmp_path / "alone", "off")
    stacked = run(store, tmp_path / "stacked", "on")
    for a, s in zip(alone, stacked, strict=True):
        assert a.status == s.status == "done", (a.failure, s.failure)
        # on the CPU, the same bytes: the same float operations, batched
        for file in ("sae_weights.safetensors", "metrics.jsonl", "sparsity.safetensors"):
            assert (s.folder / file).read_bytes() == (a.folder / file).read_bytes(), file
        assert s.final == a.final
    relu = json.loads((alone[0].folder / "metrics.jsonl").read_text().splitlines()[-1])
    assert relu["resampled_total"] > 0  # resampling really happened inside the stack
    topk = [json.loads(line)
            for line in (alone[3].folder / "metrics.jsonl").read_text().splitlines()]
    assert any(r["aux"] > 0 for r in topk)  # AuxK really acted


def test_a_failing_member_leaves_its_stack_and_the_others_go_on(store, tmp_path):
    members = [("relu", 64, {"l1_coefficient": 1.0, "lr": lr}) for lr in (5e-3, 1e6, 2e-3)]
    alone = run(store, tmp_path / "alone", "off", members)
    stacked = run(store, tmp_path / "stacked", "on", members)
    assert [r.status for r in stacked] == ["done", "failed", "done"]
    # a resumed sweep with a failed member stacks the others
    crash_at(80, lambda: run(store, tmp_path / "resumed", "on", members, checkpoint_every=40))
    resumed = run(store, tmp_path / "resumed", "on", members, checkpoint_every=40, resume=True)
    assert [r.status for r in resumed] == ["done", "failed", "done"]
    assert weights(resumed[2].folder) == weights(stacked[2].folder)
    assert stacked[1].failure == alone[1].failure
    for i in (0, 2):
        assert weights(stacked[i].folder) == weights(alone[i].folder)


def test_a_stacked_sweep_resumes_to_the_same_bytes(store, tmp_path):
    members = MEMBERS[:2]
    whole = run(store, tmp_path / "whole", "on", members, checkpoint_every=40)
    # a crash right after the step-80 checkpoint of the same sweep, then --resume
    crash_at(80, lambda: run(store, tmp_path / "resumed", "on", members, checkpoint_every=40))
    # resumed unstacked: --stack changes how, not what, a sweep trains
    resumed = run(store, tmp_path / "resumed", "off", members, checkpoint_every=40, resume=True)
    for w, r in zip(whole, resumed, strict=True):
        assert r.status == "done"
        assert (w.folder / "sae_weights.safetensors").read_bytes() == \
            (r.folder / "sae_weights.safetensors").read_bytes()


def test_stacked_members_step_memory_adds_up(store):
    from train_sae.training import memory

    cfg = TrainConfig(store=str(store), out="unused", batch_size=BATCH, device="cpu",
                      kernels="dense")
    plan = prepare(cfg)
    members = [Member(bind_hooks(make_member(a, w, dict(g), BATCH, plan.total_steps), plan),
                      plan.dims, plan.total_steps, 0, "cpu", 1e3) for a, w, g in MEMBERS[:3]]
    alone = memory.sweep_memory(members, BATCH, BATCH, plan.d_in, "cpu", 0)
    stacked = memory.sweep_memory(members, BATCH, BATCH, plan.d_in, "cpu", 0,
                                  stacks=[tuple(m.name for m in members[:2])])
    steps = [m.step for m in alone.members]
    assert alone.step == max(steps)
    assert stacked.step == max(steps[0] + steps[1], steps[2])


def test_cli_stacks_an_lr_sweep(store, tmp_path, monkeypatch, capsys):
    from conftest import invoke

    from train_sae.cli import main

    args = ["sweep", "--store", str(store), "--batch-size", "128", "--tokens", "4096",
            "--device", "cpu", "--arch", "relu", "--width", "64", "--lr", "1e-3,3e-3"]
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, *args, "--out",
                          str(tmp_path / "on"), "--stack", "on")
    assert code == 0, err
    assert "stacked (one batched step): relu-w64-lr1e-3-rs, relu-w64-lr3e-3-rs" in err
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, *args, "--out",
                          str(tmp_path / "off"), "--stack", "off")
    assert code == 0 and "stacked" not in err
    for name in ("relu-w64-lr1e-3-rs", "relu-w64-lr3e-3-rs"):
        assert weights(tmp_path / "on" / name) == weights(tmp_path / "off" / name)
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, *args, "--out",
                          str(tmp_path / "bad"), "--stack", "maybe")
    assert code == 2 and "--stack must be one of auto, on, off, got 'maybe'" in err
