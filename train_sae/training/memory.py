"""Peak memory of a sweep, estimated before training and checked against the device.

A sweep's members all live for the whole pass and step one after another on each batch
(train_sae/training/trainer.py, `SweepRun.step`), so one rank needs at its peak

    sum over its members of (weights + gradients + Adam state)         held all along
    + the largest single member's step peak                             one step at a time
    + the batches: on CUDA the current one and the next one copied in; on the CPU the
      loader's buffers, which are the same memory
    + the resampling pools of Anthropic resampling
    + the sparse step's reused [B, d_sae] buffer, while a dense member steps beside it

and on CUDA the loader's pinned buffers in host memory besides. `member_memory` is one member's
part, `sweep_memory` the rank's, `describe` the lines printed at start and `check_fits` the
refusal of a sweep that would not fit (`fail`: one `error:` line, exit 2).

Held all along, read off the built model: its parameters and buffers as they are (float32
master weights whatever --precision), one gradient per parameter, Adam's exp_avg and exp_avg_sq
(2 x the parameters) and the member's three firing counters (3 x d_sae int64; member.py).
Gradients are held all along because `Member.step` calls `zero_grad(set_to_none=True)` after
its forward pass: a member's gradients live from its backward until after its next forward, so
between steps every member's exist at once.

One step's peak (`step_peak`) is the largest of its phases. With B the rows of a batch on this
rank, lat = B x d_sae x 4 bytes (one float32 [B, d_sae] tensor), in = B x d_in x 4,
out = B x d_out x 4, each phase counts the tensors alive at its peak:

- forward + backward of the dense step (dictionaries/base.py `training_forward`, backward):
  `LATENT_DENSE[sparsity]` x lat + `IN_*` x in + `OUT_TENSORS[sparsity]` x out + 12 bytes per
  kept (row, latent) pair (topk's values and indices) + 1 x W_dec (its gradients from the main
  and the AuxK decode, summed). The TopK count, 7, is AuxK with dead latents (the worst case,
  and a common one late in training; sparsity.py `TopK.aux_loss`): pre, ReLU(pre), the kept
  acts, then AuxK's ReLU(pre), its dead-masked copy, keep_topk's zeros and the kept aux acts
  (common.py `keep_topk` builds zeros and scatters into a copy). ReLU + L1 peaks in backward at
  3 (the acts autograd saved, their summed gradient, the gradient of pre); JumpReLU's
  straight-through backward (`_JumpReLUFn`, `_window`) at 7; Gated at 6 (gate and magnitude,
  their ReLUs and products); BatchTopK adds a [B, d_sae] bool (1/4).
- forward + backward of the sparse step (dictionaries/sparse.py): no [B, d_sae] graph, but its
  AuxK builds its candidates `pre.masked_fill(~dead, 0).relu_()` beside pre (pre being the kept
  scratch buffer; measured 2 x lat at the peak, BatchTopK 2.75 with its ReLU(pre) and masks for
  the batch-wide selection) while the kept pattern exists; then backward holds no [B, d_sae]
  tensor but every pattern's sorts, gathers and CSR products, `NNZ_BYTES_SPARSE` per (row,
  latent) pair (k and AuxK's k_aux per row), and the second pattern's weight-sized gradient
  products (W_enc + W_dec), summed into the first's.
- the optimizer (`before_optimizer_step`, Adam): the acts and prediction are still alive, plus
  a unit-norm decoder's 2 x W_dec of temporaries (common.py `UnitNormDecoder`) or Adam's, from
  the member's optimizer: none for the fused kernel, sqrt(exp_avg_sq) of every parameter for
  foreach (CUDA's default), sqrt and quotient of one parameter while the previous one's is
  still referenced for the per-parameter loop (the CPU's).
- the metrics after the update (evaluation/metrics.py): the acts, a [B, d_sae] bool of fired
  latents and `METRIC_OUT` x out.
- a resampling step (resampling.py `resample_dead`): the pool concatenated, and a forward pass
  over chunks of `RESAMPLE_CHUNK` of its rows.

These counts were read off the code and checked on the CPU against the torch allocator's own
record of every allocation and free (tests/test_memory.py: the estimate lies within 0.7x-1.5x
of the measured peak for dense and sparse TopK, ReLU, BatchTopK, JumpReLU, Gated, Matryoshka,
transcoders and crosscoders). On CUDA the caching allocator rounds blocks up and fragments,
kernels take workspaces and the process holds its CUDA context, so `check_fits` keeps 1 -
`SAFETY` of the free memory in hand. Under --precision bf16/fp16 the dense step's matmuls give
half-width outputs but the bias adds and the losses are float32, and autocast keeps half-width
copies of the weights for backward: the estimate counts float32 tensors and adds those copies
(`HALF_WEIGHT_COPIES`); the sparse step's pre and AuxK candidates are half width.

Available: on CUDA the device's free memory (and what torch's allocator caches unused), on the
CPU the machine's available memory, shared evenly by the ranks torchrun started on it; plus what
the built members hold already, since the check runs after they are built.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import fail
from train_sae.dictionaries import sparse as sparse_kernels
from train_sae.dictionaries.base import Dictionary
from train_sae.dictionaries.common import UnitNormDecoder
from train_sae.training.loader import ActivationLoader

F32 = 4  # bytes of a float32
SAFETY = 0.9  # share of the available memory a sweep may plan to use
SHOW_ALL = 10  # members listed one by one up to this many; beyond, the largest few
SHOW_LARGEST = 5

# [B, d_sae] float32 tensors alive at the peak of forward + backward, by sparsity (see above)
LATENT_DENSE = {"relu": 3.25, "topk": 7.0, "batchtopk": 7.25, "jumprelu": 7.0, "gated": 6.0}
LATENT_SPARSE = {"topk": 2.0, "batchtopk": 2.75}
LATENT_UNKNOWN = 8.0  # a sparsity not measured here: above every measured one
# [B, d_out] tensors then: the prediction, its error and square (mse) and their gradients; the
# TopK family's AuxK adds the residual, the aux prediction and its error
OUT_TENSORS = {"relu": 4.0, "topk": 5.5, "batchtopk": 5.5, "jumprelu": 4.0, "gated": 6.0}
OUT_UNKNOWN = 6.0
MATRYOSHKA_OUT = 1.25  # per inner prefix (matryoshka.py): its prediction and error
# [B, d_in] tensors: x - b_dec (apply_b_dec_to_input), several hooks concatenated (crosscoder, CLT)
IN_CENTRED = 1.0
IN_CONCAT = 1.0
# weight-sized gradient temporaries of backward: a second gradient of W_dec (the main and the
# AuxK decode, Matryoshka's prefixes) summed into the first; the sparse step's W_enc and W_dec
# gradients come as [d_sae, d] products (in W_enc's own layout), the AuxK pattern's summed into
# the main one's
WEIGHT_TEMPS = {"dense": ("W_dec",), "sparse": ("W_enc", "W_dec")}
LATENT_SAVED = 4.0  # [B, d_sae] tensors autograd saved, alive then (TopK with AuxK: 4)
# per selected (row, latent) pair: the sparse step's pattern work (measured 125-140 bytes on the
# CPU), or the dense step's topk values and indices
NNZ_BYTES_SPARSE = 128
NNZ_BYTES_DENSE = 12
# what a sparse pattern keeps through the rest of the step (cols, rows, the transposed order and
# rows in int64, the values)
PATTERN_BYTES = 36
METRIC_OUT = 4.0  # metrics: x - x_hat, its square, the cosine's products
HALF_WEIGHT_COPIES = 0.5  # autocast's bf16/fp16 copies of the weights, per byte of weights
RESAMPLE_CHUNK = 8192  # rows per forward pass of resample_dead
# the loader's queue depth, as the trainer builds it (ActivationLoader's default)
LOADER_PREFETCH = inspect.signature(ActivationLoader.__init__).parameters["prefetch"].default
LOADER_BATCHES = LOADER_PREFETCH + 2  # queued, one being built, one held (loader.py)


@dataclass
class MemberMemory:
    """One member's memory on its device, in bytes."""

    name: str
    weights: int  # parameters and buffers, as the built model holds them
    grads: int  # one gradient per parameter
    adam: int  # exp_avg + exp_avg_sq (and a step count) per parameter
    step: int  # the peak of one training step on top of what it holds
    kind: str  # "dense" or "sparse" step
    counters: int = 0  # its firing counters (member.py FeatureDensity x 3)
    sparse_possible: bool = False  # a dense step that --kernels torch would make sparse
    scratch: int = 0  # the sparse step's [B, d_sae] buffer, kept between steps (sparse.py)

    @property
    def held(self) -> int:
        """What it holds all along."""
        return self.weights + self.grads + self.adam + self.counters

    @property
    def total(self) -> int:
        return self.held + self.step


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adam_temporaries(params: list[torch.Tensor], device_type: str,
                      optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes Adam's step allocates for a while (torch/optim/adam.py)."""
    defaults = optimizer.defaults if optimizer is not None else {}
    if defaults.get("fused"):
        return 0  # one in-place kernel per parameter group
    foreach = defaults.get("foreach")
    if foreach or (foreach is None and device_type == "cuda"):
        return _bytes(params)  # _foreach_sqrt(exp_avg_sqs): all at once
    sizes = [_bytes([p]) for p in params]  # per parameter: sqrt, then the quotient
    return max((2 * s + (sizes[i - 1] if i else 0) for i, s in enumerate(sizes)), default=0)


def step_peak(model: Dictionary, rows: int, device_type: str,
              optimizer: torch.optim.Optimizer | None = None, half: bool = False,
              pool_rows: int = 0) -> tuple[int, str]:
    """(the bytes one training step allocates at its peak on top of the member's weights,
    gradients and Adam state, "dense" or "sparse") for `rows` rows of a batch. `half`: the
    forward under bf16/fp16 autocast; `pool_rows`: the rows of its resampling pool, if any."""
    sparse = bool(model.sparse_kernels and model.supports_sparse)
    kind = "sparse" if sparse else "dense"
    sparsity = model.sparsity
    lat = rows * model.d_sae * F32
    inp, out = rows * model.d_in * F32, rows * model.d_out * F32
    params = [p for p in model.parameters() if p.requires_grad]
    two_decodes = hasattr(model, "k_aux") or len(getattr(model, "widths", ())) > 1
    weight_temps = sum(_bytes([getattr(model, w)]) for w in WEIGHT_TEMPS[kind]) if (
        two_decodes or sparse) else 0

    n_in = IN_CENTRED * bool(model.apply_b_dec_to_input) + IN_CONCAT * (len(model.io.inputs) > 1)
    n_out = OUT_TENSORS.get(sparsity, OUT_UNKNOWN)
    n_out += MATRYOSHKA_OUT * max(0, len(getattr(model, "widths", ())) - 1)
    io = n_in * inp + n_out * out
    # the selected (row, latent) pairs: k kept per row, and AuxK's k_aux per row (at most every
    # latent, when that many are dead)
    k = getattr(model.cfg, "k", 0)
    k_aux = min(getattr(model, "k_aux", 0), model.d_sae)
    if sparse:
        # pre and AuxK's candidates come in the product's dtype: half width under autocast
        forward = (LATENT_SPARSE.get(sparsity, LATENT_UNKNOWN) * lat / (2 if half else 1)
                   + rows * k * NNZ_BYTES_SPARSE)
        backward = rows * (k + k_aux) * NNZ_BYTES_SPARSE + weight_temps
        forward_backward = io + max(forward, backward)
        acts = rows * (k + k_aux) * PATTERN_BYTES  # the patterns, alive through the step
    else:
        latent = LATENT_DENSE.get(sparsity, LATENT_UNKNOWN)
        forward = latent * lat + rows * (k + k_aux) * NNZ_BYTES_DENSE
        # backward sums the gradients of W_dec while what autograd saved is still alive
        backward = min(latent, LATENT_SAVED) * lat + weight_temps
        forward_backward = io + max(forward, backward)
        acts = lat  # the step's acts, dense

    unit_norm = 2 * _bytes([model.W_dec]) if isinstance(model, UnitNormDecoder) else 0
    optimizer_phase = acts + out + max(unit_norm, _adam_temporaries(params, device_type,
                                                                    optimizer))
    metrics = acts + (0 if sparse else lat // 4) + METRIC_OUT * out
    resample = 0
    if pool_rows:
        chunk = min(pool_rows, RESAMPLE_CHUNK)
        resample = pool_rows * model.d_in * F32 + chunk * (2 * model.d_sae + 3 * model.d_out) * F32

    peak = max(forward_backward, optimizer_phase, metrics, resample)
    if half:
        peak += HALF_WEIGHT_COPIES * _bytes(params)
    return int(peak), kind


def member_memory(model: Dictionary, name: str, rows: int, device_type: str,
                  optimizer: torch.optim.Optimizer | None = None, half: bool = False,
                  pool_rows: int = 0) -> MemberMemory:
    """A member's memory, from its built model (and optimizer): `rows` rows of each batch on
    this rank."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = _bytes(model.parameters()) + _bytes(model.buffers())
    step, kind = step_peak(model, rows, device_type, optimizer, half, pool_rows)
    sparse_possible = kind == "dense" and model.supports_sparse
    # the sparse step's encoder product goes into one buffer kept from step to step (not under
    # autocast), shared by the members of its shape
    scratch = (rows * model.d_sae * F32
               if kind == "sparse" and not half and hasattr(sparse_kernels, "scratch") else 0)
    adam = 2 * _bytes(params) + 4 * len(params)  # exp_avg, exp_avg_sq, a float32 step count
    return MemberMemory(name, weights, _bytes(params), adam, step, kind,
                        3 * model.d_sae * 8, sparse_possible, scratch)


@dataclass
class SweepMemory:
    """One rank's part of a sweep, on `device`."""

    device: str
    members: list[MemberMemory]
    batches: int  # the batches on the device (CUDA) or the loader's buffers (CPU)
    pools: int  # resampling pools, on the device
    loader_host: int = 0  # CUDA: the loader's pinned buffers in host memory
    free: int | None = None  # free on the device now (None: unknown)
    host_free: int | None = None  # CUDA: available host memory now
    rank: int = 0
    share: int = 1  # ranks on this machine: the host memory above is this rank's 1/share of it
    # members that step together (--stack, train_sae/training/stack.py): their steps' peaks add
    stacks: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(m.held for m in self.members)

    @property
    def step(self) -> int:
        """The largest step, with the sparse step's buffer kept beside a dense member's."""
        scratch = max((m.scratch for m in self.members), default=0)
        peaks = {m.name: m.step + (0 if m.kind == "sparse" else scratch) for m in self.members}
        for names in self.stacks:  # one joint forward and backward: all of theirs at once
            joint = sum(peaks.pop(n) for n in names if n in peaks)
            peaks[" + ".join(names)] = joint
        return max(peaks.values(), default=0)

    @property
    def total(self) -> int:
        """The peak on the device."""
        return self.held + self.step + self.batches + self.pools

    @property
    def resident(self) -> int:
        """Of `total`, what the built members hold already (in no free memory)."""
        return sum(m.weights for m in self.members)

    @property
    def available(self) -> int | None:
        """What the sweep can have on the device: what is free and what it holds already."""
        return None if self.free is None else self.free + self.resident


def sweep_memory(members: Sequence[Any], rows: int, batch_size: int, widths: dict[str, int],
                 device: str, pool_rows: int, store_dtype: str = "float32", rank: int = 0,
                 total_rows: int | None = None, stacks: Sequence[tuple[str, ...]] = ()
                 ) -> SweepMemory:
    """The memory of the members one rank trains (built `Member`s, member.py) with `rows` rows
    of each batch of `batch_size` on this rank; `widths`: the hooks its loader reads (hook ->
    width) from a store of `store_dtype`; `pool_rows`: the rows of a resampling pool (trainer
    RESAMPLE_POOL_ROWS), one per hook its resampling members read, which never holds more than
    the `total_rows` of the whole training."""
    device_type = torch.device(device).type
    share = ranks_on_this_node()
    pool_hooks = {m.hooks[0] for m in members if getattr(m, "resample_steps", None)}
    kept = max(pool_rows, batch_size) + batch_size  # whole batches up to its size, plus one
    if total_rows is not None:
        kept = min(kept, total_rows)
    mems = [member_memory(m.sae, m.name, rows, device_type, getattr(m, "opt", None),
                          getattr(m, "autocast", torch.float32) != torch.float32,
                          kept if getattr(m, "resample_steps", None) else 0)
            for m in members]
    row_bytes = sum(widths.values()) * F32
    pools = sum(kept * widths[h] * F32 for h in pool_hooks)
    if device_type != "cuda":
        return SweepMemory(device, mems, LOADER_BATCHES * rows * row_bytes, pools,
                           free=_share(available_memory(device), share), rank=rank, share=share,
                           stacks=list(stacks))
    # a 16-bit store crosses as its 16 bits and is widened on the GPU (loader.py `ship_raw`)
    raw = store_dtype in ("bfloat16", "float16")
    host = LOADER_BATCHES * rows * row_bytes // (2 if raw else 1)
    on_device = 2 * rows * row_bytes + (rows * row_bytes // 2 if raw else 0)
    return SweepMemory(device, mems, on_device, pools, host, available_memory(device),
                       _share(available_memory("cpu"), share), rank, share, list(stacks))


def ranks_on_this_node() -> int:
    """How many ranks torchrun started on this machine (LOCAL_WORLD_SIZE; 1 without torchrun):
    they share its memory (each rank has a GPU of its own)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _share(free: int | None, share: int) -> int | None:
    return None if free is None else free // share


# --- what is free ---------------------------------------------------------------------------
def available_memory(device: str) -> int | None:
    """Bytes free for this process on `device` now: on CUDA the driver's free memory plus what
    torch's caching allocator holds unused; on the CPU the system's available memory (psutil,
    else /proc/meminfo MemAvailable). None when it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            free, _ = torch.cuda.mem_get_info(index)
            cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        except (RuntimeError, AssertionError):  # no driver to ask
            return None
        return int(free + cached)
    if dev.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- what is printed and checked --------------------------------------------------------------
def human(n: float) -> str:
    """Bytes as `12.3 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _member_line(m: MemberMemory) -> str:
    return (f"  {m.name}: weights {human(m.weights)} + grads {human(m.grads)} + Adam "
            f"{human(m.adam)} + {m.kind} step peak {human(m.step)} = {human(m.total)}")


def describe(ranks: Sequence[SweepMemory]) -> list[str]:
    """The lines printed at start: each member (every one up to SHOW_ALL, else the SHOW_LARGEST
    largest and a summary line) and each rank's peak against what its device has available.
    `ranks`: every rank's SweepMemory (one in one process)."""
    members = [m for r in ranks for m in r.members]
    names = [[m.name for m in r.members] for r in ranks]
    if len(ranks) > 1 and all(n == names[0] for n in names):  # data parallel: the same members
        members = list(ranks[0].members)
    lines = ["memory per member (weights + gradients + Adam state + the peak of one step):"]
    shown = members if len(members) <= SHOW_ALL else sorted(
        members, key=lambda m: -m.total)[:SHOW_LARGEST]
    lines += [_member_line(m) for m in shown]
    if len(shown) < len(members):
        rest = [m for m in members if m not in shown]
        lines.append(f"  ... and {len(rest)} more of at most {human(max(m.total for m in rest))}"
                     f" each, {human(sum(m.total for m in rest))} in all")
    lines += [_total_line(r, f"rank {r.rank}: " if len(ranks) > 1 else "") for r in ranks]
    return lines


def _parts(r: SweepMemory) -> str:
    return (f"{len(r.members)} member(s) hold {human(r.held)}, the largest step adds "
            f"{human(r.step)}, batches {human(r.batches)}"
            + (f", resampling pools {human(r.pools)}" if r.pools else ""))


def _total_line(r: SweepMemory, prefix: str = "") -> str:
    share = f" (this rank's 1/{r.share} of the machine's)" if r.share > 1 else ""
    text = f"{prefix}peak memory on {r.device}: about {human(r.total)} ({_parts(r)})"
    available = r.available
    if available is None:
        text += "; what is free there is unknown, not checked"
    else:
        text += f"; {human(available)} available" + ("" if r.loader_host else share)
    if r.loader_host:
        text += (f"; the loader's pinned buffers take {human(r.loader_host)} of host memory"
                 + (f", {human(r.host_free)} available{share}" if r.host_free is not None
                    else ""))
    return text


def _device_fits(r: SweepMemory) -> bool:
    return r.available is None or r.total <= SAFETY * r.available


def _host_fits(r: SweepMemory) -> bool:
    return r.host_free is None or r.loader_host <= SAFETY * r.host_free


def fits(r: SweepMemory) -> bool:
    """Whether one rank's part fits (`check_fits` passes)."""
    return _device_fits(r) and _host_fits(r)


def check_fits(r: SweepMemory) -> None:
    """Refuse, with one `error:` line naming the need, what is available and the fixes, a sweep
    whose peak exceeds SAFETY x what its device (or, on CUDA, the host for the loader's
    buffers) has available."""
    where = f"rank {r.rank}'s " if r.rank else ""
    available = r.available
    if available is not None and not _device_fits(r):
        largest = max(r.members, key=lambda m: m.total, default=None)
        fixes = ("train fewer or smaller members per process (spread them over GPUs or machines "
                 "with torchrun --nproc-per-node N, or over several sweeps) or a smaller "
                 "--batch-size")
        stepper = max(r.members, key=lambda m: m.step, default=None)
        if stepper is not None and stepper.sparse_possible:
            fixes += (f", or --kernels torch (the dense step of {stepper.name}, mostly "
                      f"[batch, width] activations, peaks at {human(stepper.step)})")
        fail(f"the sweep would not fit in {where}{r.device} memory: it needs about "
             f"{human(r.total)} ({_parts(r)}"
             + (f"; the largest member, {largest.name}, {human(largest.total)}" if largest else "")
             + f") but {human(available)} is available; {fixes}")
    if r.host_free is not None and not _host_fits(r):
        fail(f"the loader's buffers would not fit in {where}host memory: {LOADER_BATCHES} batches "
             f"of every hook read take about {human(r.loader_host)} but {human(r.host_free)} is "
             "available; a smaller --batch-size or fewer hooks per sweep")


def print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)
