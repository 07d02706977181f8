"""Stacked members: several members of a sweep trained as one module with a member dimension.

Members that differ only in their optimizer settings (LR, betas, warm-up, decay, clipping), their
resampling, their loss coefficients (`l1_coefficient`, `aux_coefficient`, `l0_coefficient`) and
what their class lists in `stack_varying` (TopK's `k`: each member keeps the k_m largest of the
k_max largest), and share everything else (dictionary class, hooks, width, the other hyperparameters, the dense
step), run one forward and one backward pass together: every parameter and buffer is stacked into
one tensor [M, *shape], so each product is one batched matmul over the M members (`bmm`), with the
coefficients as [M] tensors. The dictionary code is written to broadcast over that leading
dimension (biases are applied with `unsqueeze(-2)`, means over the batch on dim -1 of per-row
terms), so a stack runs the very `training_forward` of its class.

Each member keeps its own parameters, optimizer, LR schedule, resampling and metrics: its
parameters become views of its slice of the stacked tensors (so its optimizer, the decoder-norm
projection and resampling write into the stack in place), and after the joint backward each
member's gradients are views of its slice of the stacked gradients. The joint loss is the sum of
the members' losses, whose gradient for each member's slice is that member's own gradient; so a
stacked member trains as it would alone (the same float operations but batched; tests check the
weights after training against members trained one by one). A member that fails leaves the stack,
which is rebuilt from the others at the next step; checkpoints and saving see members with their
own storage again (`release`).

Data-parallel members (`--data-parallel`) are not stacked: their batch statistics reduce over
the ranks per member.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from train_sae.dictionaries.base import TERM_WEIGHTS, WHOLE_BATCH, TrainOutput, TrainProgress
from train_sae.training.member import Member

# hyperparameters that may differ within a stack: loss weights, held as [M] tensors
COEFFICIENTS = tuple(weight for weight, _ in TERM_WEIGHTS.values())


def stack_key(m: Member) -> tuple | None:
    """What members must share to train stacked (None: this one trains alone)."""
    sae = m.sae
    if not type(sae).stackable or sae.sparse_kernels or m.batch is not WHOLE_BATCH:
        return None
    varying = COEFFICIENTS + type(sae).stack_varying
    params = {k: v for k, v in dataclasses.asdict(m.cfg.params).items() if k not in varying}
    return (type(sae), m.cfg.hooks, m.cfg.outputs, m.cfg.d_sae, repr(sorted(params.items())))


def stack_groups(members: Iterable[Member]) -> list[list[Member]]:
    """The members in groups that may train stacked (a group of one trains alone), in order."""
    groups: dict[Any, list[Member]] = {}
    for i, m in enumerate(members):
        key = stack_key(m)
        groups.setdefault(i if key is None else key, []).append(m)
    return list(groups.values())


def stack_like(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[M, *shape] of M tensors of one shape, each slice laid out (strides) as the first is: a
    member's parameters and gradients keep the layout they have alone (W_enc starts as W_dec^T),
    since a reduction over a tensor (the gradient norm of clipping) rounds by its layout."""
    first = tensors[0]
    out = torch.empty_strided((len(tensors), *first.shape), (first.numel(), *first.stride()),
                              dtype=first.dtype, device=first.device)
    for slot, t in zip(out, tensors, strict=True):
        slot.copy_(t)
    return out


class MemberStack:
    """Members of one stack key training as one module (see the module docstring)."""

    def __init__(self, members: list[Member]):
        assert len(members) > 1 and len({stack_key(m) for m in members}) == 1
        self.members = members
        self.names = tuple(m.name for m in members)
        first = members[0].sae
        # the stacked module: the first member's class, config and attributes, with a member
        # dimension on every parameter and buffer (stackable classes have no submodules)
        module = copy.copy(first)
        module._parameters, module._buffers = {}, {}
        module.__dict__.pop("_compiled", None)  # --compile: a graph of its own, not the first's
        for name, _ in first.named_parameters():
            stacked = stack_like([m.sae.get_parameter(name).detach() for m in members])
            module._parameters[name] = nn.Parameter(stacked)
        for name, _ in first.named_buffers():
            module._buffers[name] = stack_like([m.sae.get_buffer(name) for m in members])
        module.cfg = self._stacked_config(first.cfg, first.b_dec.device)
        self.module = module
        for i, m in enumerate(members):  # each member's tensors: views of its slice
            for name, p in m.sae.named_parameters():
                p.data = module._parameters[name].data[i]
            for name in module._buffers:
                m.sae._buffers[name] = module._buffers[name][i]

    def _stacked_config(self, cfg: Any, device: torch.device) -> Any:
        """The first member's config with each loss weight (and each `stack_varying`
        hyperparameter, such as TopK's k) that differs as an [M] tensor."""
        cfg = copy.copy(cfg)
        for name in COEFFICIENTS + type(self.members[0].sae).stack_varying:
            if not hasattr(cfg, name):
                continue
            values = [getattr(m.cfg.params, name) for m in self.members]
            if len(set(values)) > 1:
                # a weight in float64, so the warm-up scales it as it scales a Python float
                dtype = torch.float64 if name in COEFFICIENTS else torch.long
                object.__setattr__(cfg, name, torch.tensor(values, dtype=dtype, device=device))
        return cfg

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, progress: TrainProgress
                         ) -> list[TrainOutput]:
        """One joint training forward and backward on inputs x [batch, d_in] and targets y;
        leaves each member's gradients in place and returns each member's output."""
        with self.members[0].autocast_context():
            out = self.module.training_forward(x, progress, y)  # loss [M], x_hat [M, batch, d]
        for p in self.module.parameters():
            p.grad = None
        # fp16: each member's loss scaled by its own scaler (a no-op otherwise)
        total = sum(m.scaler.scale(out.loss[i]) for i, m in enumerate(self.members))
        total.backward()  # type: ignore[union-attr]
        outs = []
        for i, m in enumerate(self.members):
            m.opt.zero_grad(set_to_none=True)
            for name, p in m.sae.named_parameters():
                p.grad = self.module._parameters[name].grad[i]
            parts = {k: v[i] if v.dim() else v for k, v in out.parts.items()}
            outs.append(TrainOutput(out.loss[i], out.x_hat[i], out.acts[i], parts))
        return outs

    def release(self) -> None:
        """Give every running member its own storage again (before a checkpoint, saving, or a
        change of the stack's members)."""
        for m in self.members:
            if m.status != "running":
                continue
            for p in m.sae.parameters():
                p.data = p.data.clone()
                p.grad = None
            for name in self.module._buffers:
                m.sae._buffers[name] = m.sae._buffers[name].clone()
        self.module = None  # type: ignore[assignment]


class Stacks:
    """A sweep's stacks, kept from step to step while their members run (`--stack`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.active: dict[tuple[str, ...], MemberStack] = {}

    def groups(self, live: list[Member]) -> list[list[Member]]:
        """This step's groups of the live members; a stack for each group of several."""
        groups = stack_groups(live) if self.enabled else [[m] for m in live]
        wanted = {tuple(m.name for m in g): g for g in groups if len(g) > 1}
        for names in [n for n in self.active if n not in wanted]:
            self.active.pop(names).release()
        for names, g in wanted.items():
            if names not in self.active:
                self.active[names] = MemberStack(g)
        return groups

    def get(self, group: list[Member]) -> MemberStack:
        return self.active[tuple(m.name for m in group)]

    def release(self) -> None:
        for stack in self.active.values():
            stack.release()
        self.active.clear()
