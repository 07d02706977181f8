"""--compile: the dense step's forward through torch.compile trains as the eager one does."""

import dataclasses

import pytest
import torch

from train_sae.dictionaries import TrainProgress
from train_sae.training.config import StepOptions
from train_sae.training.member import Member
from train_sae.training.stack import MemberStack
from train_sae.training.sweep import make_member
from train_sae.training.trainer import stacked_step

STEPS, BATCH, D = 4, 64, 16


def members(specs, compile_step):
    out = []
    for arch, params in specs:
        cfg = dataclasses.replace(make_member(arch, 32, dict(params), BATCH, STEPS), hooks=("h",))
        out.append(Member(cfg, {"h": D}, STEPS, 0, "cpu", 1e3,
                          options=StepOptions("dense", "fp32", compile_step)))
    return out


def train(ms, stacked=False):
    gen = torch.Generator().manual_seed(0)
    stack = MemberStack(ms) if stacked else None
    for step in range(STEPS):
        batch = {"h": torch.randn(BATCH, D, generator=gen)}
        progress = TrainProgress(step, STEPS, step * BATCH)
        if stack:
            stacked_step(stack, batch, step, progress, {}, False)
        else:
            for m in ms:
                m.step(batch, step, progress, {}, False)
    if stack:
        stack.release()
    return [{k: v.clone() for k, v in m.sae.state_dict().items()} for m in ms]


def assert_same(a, b):
    for wa, wb in zip(a, b, strict=True):
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_relu_trains_as_eager():
    specs = [("relu", {"lr": 1e-2})]
    compiled = members(specs, True)
    assert_same(train(members(specs, False)), train(compiled))
    assert "_compiled" in compiled[0].sae.__dict__  # the compiled graph really ran


@pytest.mark.slow
def test_compiled_topk_and_a_compiled_stack_train_as_eager():
    specs = [("topk", {"k": 4, "lr": 1e-2}), ("topk", {"k": 8, "lr": 3e-3})]
    eager = train(members(specs, False))
    assert_same(eager, train(members(specs, True)))
    assert_same(eager, train(members(specs, True), stacked=True))
