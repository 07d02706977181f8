"""Sparse training of the TopK family: only the selected latents cost anything past the encoder.

A TopK-family step needs one dense product, the encoder's pre-activations `pre = x W_enc + b_enc
[batch, d_sae]`, to choose the active latents. Everything after it touches only the `nnz` selected
(row, latent) pairs (k per row for TopK, k x batch in all for BatchTopK):

    forward   vals = ReLU(pre[rows, cols])                      (gathered, no dense acts)
              y    = A @ W_dec,  A the [batch, d_sae] CSR matrix of vals   (nnz x d_out)
    backward  dL/dvals  = sampled (dL/dy) W_dec^T at the selected pairs      (SDDMM, nnz x d_out)
              dL/dW_dec = A^T (dL/dy)        only the selected rows are non-zero  (nnz x d_out)
              dL/dW_enc = x^T G,  G the CSR matrix of dL/dpre at the selected pairs (nnz x d_in)
              dL/db_enc = G summed over rows;  dL/dx = G W_enc^T (when x needs it)

so a step costs the encoder's forward product plus O(nnz x d), against the dense step's five
products of batch x d_sae x d (OpenAI's sparse_autoencoder kernels, Gao et al. 2024 sec. D.3,
do the same on GPU). `pre` is computed without autograd (no [batch, d_sae] graph is kept); the
two autograd functions below carry the sparse gradients. Both run on CPU and CUDA through
torch's CSR kernels (`torch.sparse.mm`, `torch.sparse.sampled_addmm`), or on CUDA through the
Triton kernels of train_sae/dictionaries/triton_kernels.py (`--kernels triton`; SparseActs.backend).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from train_sae.dictionaries import triton_kernels

# torch warns once that its CSR tensors are "beta"; the kernels used here are checked against the
# dense step in tests/test_sparse_kernels.py
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass
class SparseActs:
    """Latent activations as the non-zero entries of a [batch, d_sae] matrix, row by row: row b
    holds entries crow[b]:crow[b+1] of `cols` (latents) and `vals` (values, differentiable)."""

    crow: torch.Tensor  # [batch + 1] int64
    cols: torch.Tensor  # [nnz] int64
    vals: torch.Tensor  # [nnz]
    shape: tuple[int, int]  # (batch, d_sae)
    backend: str = "torch"  # whose kernels run its products: torch's CSR ops, or "triton"

    def __post_init__(self) -> None:
        counts = self.crow[1:] - self.crow[:-1]
        # [nnz] the row of every entry
        self.rows = torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.cols.device), counts)
        # the pattern sorted by latent, built once per step and shared by `with_vals` copies
        self._transposed: dict[str, torch.Tensor] = {}

    def with_vals(self, vals: torch.Tensor) -> SparseActs:
        """The same pattern with other values."""
        out = SparseActs.__new__(SparseActs)
        out.__dict__.update(self.__dict__)
        out.vals = vals
        return out

    def detach(self) -> SparseActs:
        return self.with_vals(self.vals.detach())

    def dense(self) -> torch.Tensor:
        """The [batch, d_sae] matrix (differentiable through vals)."""
        out = self.vals.new_zeros(self.shape)
        return out.index_put((self.rows, self.cols), self.vals)

    def masked(self, keep: torch.Tensor) -> SparseActs:
        """The same entries with vals zeroed where `keep: [nnz] bool` is False."""
        return self.with_vals(self.vals * keep)

    def fired(self) -> torch.Tensor:
        """[nnz] bool: the entries that are non-zero."""
        return self.vals.detach() != 0

    def l0(self) -> torch.Tensor:
        """Mean number of non-zero latents per row (scalar)."""
        return self.fired().sum().to(torch.float32) / self.shape[0]

    def firing_counts(self) -> torch.Tensor:
        """[d_sae] how many rows each latent fired on (int64)."""
        return torch.bincount(self.cols[self.fired()], minlength=self.shape[1])

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The [batch, d_sae] CSR matrix of this pattern with `values` [nnz]."""
        # the pattern is ours and valid by construction: no per-call invariant check
        return torch.sparse_csr_tensor(self.crow, self.cols, values, self.shape,
                                       check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """The [d_sae, batch] CSR matrix of the transposed pattern with `values` [nnz] (given in
        row order)."""
        order, crow = self.transposed()
        return torch.sparse_csr_tensor(crow, self._transposed["rows"], values[order],
                                       (self.shape[1], self.shape[0]), check_invariants=False)

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, crow) of the pattern sorted by latent: entry order[j] is the j-th, latent
        l's entries are crow[l]:crow[l + 1] of that order (built once per step)."""
        t = self._transposed
        if not t:
            t["order"] = torch.argsort(self.cols, stable=True)
            t["crow"] = torch.zeros(self.shape[1] + 1, dtype=torch.long, device=self.cols.device)
            t["crow"][1:] = torch.bincount(self.cols, minlength=self.shape[1]).cumsum(0)
            t["rows"] = self.rows[t["order"]]
        return t["order"], t["crow"]


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [batch, d_sae] buffer for the encoder's product, reused from step to step and by every
    member of that shape (members step one after another and no step keeps it past its
    backward), so the 256 MiB-1 GiB product is not a fresh allocation (page faults) each step."""
    key = (tuple(shape), dtype, device)
    if key not in _SCRATCH:
        _SCRATCH.clear()  # one shape at a time: a sweep's members of another width re-allocate
        _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return _SCRATCH[key]


def topk_pattern(pre: torch.Tensor, k: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, cols) of the k largest entries of each row of `pre` [batch, d_sae] (of each of
    `groups` equal column groups), latents in ascending order within a row."""
    batch, width = pre.shape
    if groups == 1:
        cols = pre.topk(k, dim=-1, sorted=False).indices
    else:
        per = width // groups
        idx = pre.reshape(batch, groups, per).topk(k, dim=-1, sorted=False).indices
        cols = (idx + torch.arange(groups, device=pre.device)[:, None] * per).reshape(batch, -1)
    cols = cols.sort(dim=-1).values.reshape(-1)
    crow = torch.arange(0, cols.numel() + 1, cols.numel() // batch, device=pre.device)
    return crow, cols


def mask_pattern(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, cols) of the True entries of `mask` [batch, d_sae], row by row."""
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)
    crow[1:] = torch.bincount(rows, minlength=mask.shape[0]).cumsum(0)
    return crow, cols


class _GatherPre(torch.autograd.Function):
    """pre[rows, cols] of pre = x W_enc + b_enc (given, computed without autograd), with the
    sparse gradients of W_enc, b_enc and x."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, acts: SparseActs):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc)
        ctx.acts = acts
        return pre[acts.rows, acts.cols]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, W_enc = ctx.saved_tensors
        acts: SparseActs = ctx.acts
        g = g.to(W_enc.dtype)  # the selected pre-activations may be bf16 under autocast
        grad_x = grad_W = grad_b = None
        triton = acts.backend == "triton"
        if ctx.needs_input_grad[1]:  # [d_sae, d_in] = G^T x, seen as W_enc's [d_in, d_sae]
            if triton:  # written straight into W_enc's layout
                grad_W = torch.empty_like(W_enc)
                triton_kernels.spmm_t(acts.rows, acts.cols, g, x, acts.shape[1],
                                      transposed=acts.transposed(), out=grad_W.t())
            else:
                grad_W = (acts.csr_t(g) @ x).t()
                if grad_W.stride() != W_enc.stride():  # autograd would copy it into that layout
                    grad_W = grad_W.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = torch.bincount(acts.cols, weights=g, minlength=acts.shape[1]).to(g.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (triton_kernels.spmm(acts.crow, acts.cols, g, W_enc.t()) if triton
                      else acts.csr(g) @ W_enc.t()).to(x.dtype)
        return grad_x, grad_W, grad_b, None, None


class _Decode(torch.autograd.Function):
    """A @ W_dec for the CSR matrix A of (pattern, vals), with sparse gradients."""

    @staticmethod
    def forward(ctx, vals, W_dec, acts: SparseActs):  # type: ignore[override]
        ctx.save_for_backward(vals, W_dec)
        ctx.acts = acts
        # the CSR products run in the decoder's dtype (fp32 master weights under --precision:
        # autocast does not cover sparse ops; the encoder's dense product is the one it speeds up)
        with torch.autocast(W_dec.device.type, enabled=False):
            if acts.backend == "triton":
                return triton_kernels.spmm(acts.crow, acts.cols, vals.to(W_dec.dtype), W_dec)
            return acts.csr(vals.to(W_dec.dtype)) @ W_dec

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        vals, W_dec = ctx.saved_tensors
        acts: SparseActs = ctx.acts
        g = g.to(W_dec.dtype)
        grad_vals = grad_W = None
        triton = acts.backend == "triton"
        if ctx.needs_input_grad[0]:  # <g[row], W_dec[col]> at every selected pair (SDDMM)
            if triton:
                grad_vals = triton_kernels.sddmm(acts.rows, acts.cols, g, W_dec)
            else:
                pattern = acts.csr(torch.zeros(vals.shape, dtype=W_dec.dtype, device=vals.device))
                grad_vals = torch.sparse.sampled_addmm(pattern, g, W_dec.t(), beta=0.0).values()
            grad_vals = grad_vals.to(vals.dtype)
        if ctx.needs_input_grad[1]:
            if triton:
                grad_W = triton_kernels.spmm_t(acts.rows, acts.cols, vals.to(W_dec.dtype), g,
                                               acts.shape[1], transposed=acts.transposed())
            else:
                grad_W = acts.csr_t(vals.to(W_dec.dtype)) @ g
        return grad_vals, grad_W, None


def gather_pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor,
               crow: torch.Tensor, cols: torch.Tensor, backend: str = "torch") -> SparseActs:
    """The selected pre-activations as SparseActs, differentiable into x, W_enc and b_enc;
    `backend`: whose kernels run the products (torch, or triton)."""
    # the autograd node keeps the pattern, not the object holding its own output (no cycle:
    # each step's tensors are freed as soon as the step drops them)
    pattern = SparseActs(crow, cols, cols.new_empty(0, dtype=pre.dtype), tuple(pre.shape),
                         backend)
    return pattern.with_vals(_GatherPre.apply(x, W_enc, b_enc, pre, pattern))


def fired_latents(acts: torch.Tensor | SparseActs) -> torch.Tensor:
    """[d_sae] bool: the latents non-zero on some row of this batch share."""
    if isinstance(acts, SparseActs):
        return acts.firing_counts() > 0
    return (acts != 0).any(dim=-2)  # over the rows (of each member, stacked)


def decode(acts: SparseActs, W_dec: torch.Tensor) -> torch.Tensor:
    """acts @ W_dec [batch, d_out], differentiable into acts.vals and W_dec."""
    return _Decode.apply(acts.vals, W_dec, acts)
