"""--precision: the dictionaries' matmuls under autocast (bf16, or fp16 with loss scaling), master
weights, Adam state and losses in fp32; training lands where fp32 training does."""

from __future__ import annotations

import pytest
import torch
from synthetic import make_sparse_data

from shared.errors import UserError
from train_sae.dictionaries import TrainProgress
from train_sae.training.config import StepOptions, TrainConfig
from train_sae.training.member import Member
from train_sae.training.sweep import make_member

STEPS, BATCH = 32, 256


def final_fvu(arch: str, params: dict, kernels: str, precision: str) -> tuple[float, Member]:
    x, _ = make_sparse_data(STEPS * BATCH, 32, 64, 3, seed=0)
    cfg = make_member(arch, 128, {**params, "lr": 3e-3}, BATCH, STEPS, hooks=("h",))
    m = Member(cfg, {"h": 32}, STEPS, 0, "cpu", 1e3, options=StepOptions(kernels, precision))
    for step in range(STEPS):
        _, rec = m.step({"h": 3 * x[step * BATCH:(step + 1) * BATCH]}, step,
                        TrainProgress(step, STEPS, step * BATCH), {}, step == STEPS - 1)
    return rec["fvu"], m


@pytest.mark.parametrize("arch, params, kernels", [
    ("topk", {"k": 4}, "dense"), ("topk", {"k": 4}, "sparse"),
    ("batchtopk", {"k": 4}, "sparse"), ("relu", {"l1_coefficient": 1.0}, "dense"),
])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trains_like_fp32(arch, params, kernels, precision):
    reference, _ = final_fvu(arch, params, kernels, "fp32")
    fvu, m = final_fvu(arch, params, kernels, precision)
    assert all(p.dtype == torch.float32 for p in m.sae.parameters())  # master weights
    assert abs(fvu - reference) < 0.03, (fvu, reference)
    state = m.state_dict()
    assert (state["scaler"] != {}) == (precision == "fp16")  # the loss scale resumes too


def test_unknown_precision_is_refused():
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16, fp16"):
        TrainConfig(store="s", out="o", precision="fp8")
