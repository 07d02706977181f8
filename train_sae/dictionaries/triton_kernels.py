"""Triton kernels for the sparse TopK-family step (the `--kernels triton` path of sparse.py).

The sparse step (train_sae/dictionaries/sparse.py) needs three products of a [batch, d_sae]
matrix A given as a CSR pattern (crow [batch + 1], cols [nnz] latents ascending within a row,
rows [nnz] the row of each entry) and values vals [nnz]:

    spmm(crow, cols, vals, W)          A @ W              [batch, d]    decode; dL/dx = G W_enc^T
    sddmm(rows, cols, G, W)            <G[rows], W[cols]> [nnz]         dL/dvals
    spmm_t(rows, cols, vals, D, n_out) A^T @ D            [n_out, d]    dL/dW_dec, dL/dW_enc^T

each O(nnz x d) instead of the dense O(batch x d_sae x d). OpenAI's sparse_autoencoder ships
kernels for the same three products (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders", sec. D.3); these are written from the formulas above.

Numerics: values may be fp32 or bf16 (independently for each operand); every product
accumulates in fp32 and the result is cast once to the dtype of the dense operand (W, or D
for spmm_t; of `out` when given), like torch's CSR products. Each output element is summed by
one program in a fixed order: the results are deterministic (no atomics).

Layouts: the dense operands may be any strided view (W_enc.t() of a row-major W_enc is
accepted as is; its gathers are strided, so a row-major operand reads faster). `out=` takes a
preallocated result of any strides, for example `torch.empty(d_in, d_sae).t()` to write
dL/dW_enc^T straight into W_enc's layout without a copy.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (tests; slow): that needs
TRITON_INTERPRET=1 in the environment before triton is first imported in the process (triton
builds its own language functions for the compiler or the interpreter at import), so tests run
it in a subprocess. Block sizes below are chosen from the shapes, not tuned on a GPU.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs nothing from here
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET=1 set before its import)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)  # TRITON_INTERPRET


def unavailable_reason() -> str | None:
    """None when the kernels can run here, otherwise one line saying why and what to do."""
    if triton is None:
        return ("--kernels triton needs the triton package (pip install triton); "
                "use --kernels torch")
    if not (torch.cuda.is_available() or interpreting()):
        return "--kernels triton needs a CUDA device; use --kernels torch on CPU"
    return None


def available() -> bool:
    """Triton is importable and there is a CUDA device (or its CPU interpreter is switched on)."""
    return unavailable_reason() is None


class TritonUnavailable(RuntimeError):
    """Raised by the kernels where they cannot run; its message is unavailable_reason()."""


def _require(*tensors: torch.Tensor) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise TritonUnavailable(reason)
    device = tensors[0].device
    assert all(t.device == device for t in tensors), "operands on different devices"
    if device.type != "cuda" and not interpreting():
        raise TritonUnavailable(
            f"--kernels triton runs on CUDA tensors, got tensors on {device}; use --kernels torch")


# ---- kernels -------------------------------------------------------------------------------
# Plain functions, wrapped by triton.jit on first use (`_kernels`): this module imports without
# triton, and nothing is built until the triton path is chosen.

def _spmm_kernel(crow, cols, vals, W, out, d, stride_w0, stride_w1, stride_o0, stride_o1,
                 BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, d-block] = sum over the entries e of row r of vals[e] * W[cols[e], d-block].

    Grid (batch, cdiv(d, BLOCK_D)): one program per output row slice, so every output element
    is written once, in full (empty rows give zeros). It walks its row's entries BLOCK_NNZ at a
    time: a [BLOCK_NNZ, BLOCK_D] gather of W rows, scaled and summed over the entries."""
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    start = tl.load(crow + row).to(tl.int64)
    end = tl.load(crow + row + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(start, end, BLOCK_NNZ):
        offs = first + tl.arange(0, BLOCK_NNZ)
        in_row = offs < end
        c = tl.load(cols + offs, mask=in_row, other=0).to(tl.int64)
        v = tl.load(vals + offs, mask=in_row, other=0.0).to(tl.float32)
        w = tl.load(W + c[:, None] * stride_w0 + offs_d[None, :] * stride_w1,
                    mask=in_row[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(out + row * stride_o0 + offs_d * stride_o1, acc.to(out.dtype.element_ty), mask=in_d)


def _sddmm_kernel(rows, cols, G, W, out, nnz, d, stride_g0, stride_g1, stride_w0, stride_w1,
                  BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[e] = <G[rows[e]], W[cols[e]]> for BLOCK_NNZ entries e per program, over d in
    BLOCK_D chunks (two [BLOCK_NNZ, BLOCK_D] gathers per chunk). Entries of one row are
    neighbours (CSR order), so their G row is read once from memory and then from cache."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_NNZ + tl.arange(0, BLOCK_NNZ)
    valid = offs < nnz
    r = tl.load(rows + offs, mask=valid, other=0).to(tl.int64)
    c = tl.load(cols + offs, mask=valid, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_NNZ], dtype=tl.float32)
    for first in range(0, d, BLOCK_D):
        offs_d = first + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = valid[:, None] & (offs_d < d)[None, :]
        g = tl.load(G + r[:, None] * stride_g0 + offs_d[None, :] * stride_g1, mask=mask,
                    other=0.0).to(tl.float32)
        w = tl.load(W + c[:, None] * stride_w0 + offs_d[None, :] * stride_w1, mask=mask,
                    other=0.0).to(tl.float32)
        acc += tl.sum(g * w, axis=1)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=valid)


@functools.cache
def _kernels() -> SimpleNamespace:
    """The jit-wrapped kernels (compiled per signature on first launch, or interpreted)."""
    return SimpleNamespace(spmm=triton.jit(_spmm_kernel), sddmm=triton.jit(_sddmm_kernel))


# Block sizes (not tuned on a GPU; chosen from the shapes). BLOCK_D: a 128-wide slice of the
# dense dimension per program, 512 B of fp32 per gathered row (whole 128 B lines, coalesced), or
# the power of two covering a smaller d. SPMM_BLOCK_NNZ: the entries of one row gathered at once;
# a 16 x 128 fp32 tile is 16 values per thread at the default 4 warps (few registers, many
# programs resident) and a TopK row (k = 32-64) takes 2-4 iterations. SDDMM_BLOCK_NNZ: 32
# entries per program, two 32 x 128 tiles per step along d.
_MAX_BLOCK_D = 128
SPMM_BLOCK_NNZ = 16
SDDMM_BLOCK_NNZ = 32
# FMA contraction on (as in torch's CUDA kernels); passing it also keeps triton 3.9 from warning
# that its default will change
_LAUNCH = {"enable_fp_fusion": True}


def _block_d(d: int, block_d: int | None) -> int:
    return block_d or min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(d)))


def _check_pattern(*index: torch.Tensor) -> None:
    for t in index:
        assert t.dim() == 1 and not t.is_floating_point() and t.is_contiguous(), \
            "pattern tensors are contiguous 1-d integer tensors"


# ---- the primitives ------------------------------------------------------------------------

def spmm(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, *,
         out: torch.Tensor | None = None, block_d: int | None = None,
         block_nnz: int | None = None) -> torch.Tensor:
    """A @ W: [batch, d] in W's dtype, for A the CSR matrix (crow [batch + 1], cols, vals [nnz])
    and W [n, d] (any strides). `out` (any strides) receives the result when given."""
    _require(crow, cols, vals, W)
    _check_pattern(crow, cols)
    vals = vals.contiguous()
    batch, d = crow.numel() - 1, W.shape[1]
    if out is None:
        out = torch.empty(batch, d, dtype=W.dtype, device=W.device)
    assert out.shape == (batch, d) and cols.numel() == vals.numel()
    if batch == 0 or d == 0:
        return out
    bd = _block_d(d, block_d)
    bn = block_nnz or SPMM_BLOCK_NNZ
    _kernels().spmm[(batch, triton.cdiv(d, bd))](
        crow, cols, vals, W, out, d, W.stride(0), W.stride(1), out.stride(0), out.stride(1),
        BLOCK_NNZ=bn, BLOCK_D=bd, **_LAUNCH)
    return out


def sddmm(rows: torch.Tensor, cols: torch.Tensor, G: torch.Tensor, W: torch.Tensor, *,
          block_d: int | None = None, block_nnz: int | None = None) -> torch.Tensor:
    """[nnz] <G[rows[e]], W[cols[e]]> in W's dtype: the product G @ W^T sampled at the pattern,
    for G [batch, d] and W [n, d] (any strides)."""
    _require(rows, cols, G, W)
    _check_pattern(rows, cols)
    nnz, d = rows.numel(), G.shape[1]
    assert cols.numel() == nnz and W.shape[1] == d
    out = torch.empty(nnz, dtype=W.dtype, device=W.device)
    if nnz == 0:
        return out
    bd = _block_d(d, block_d)
    bn = block_nnz or SDDMM_BLOCK_NNZ
    _kernels().sddmm[(triton.cdiv(nnz, bn),)](
        rows, cols, G, W, out, nnz, d, G.stride(0), G.stride(1), W.stride(0), W.stride(1),
        BLOCK_NNZ=bn, BLOCK_D=bd, **_LAUNCH)
    return out


def transpose_pattern(cols: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, crow_t): the entries sorted by latent (stable: rows ascending within a latent)
    and the CSR row pointer [n_out + 1] of that transposed pattern."""
    order = torch.argsort(cols, stable=True)
    crow_t = torch.zeros(n_out + 1, dtype=torch.long, device=cols.device)
    crow_t[1:] = torch.bincount(cols, minlength=n_out).cumsum(0)
    return order, crow_t


def spmm_t(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, D: torch.Tensor,
           n_out: int, *, transposed: tuple[torch.Tensor, torch.Tensor] | None = None,
           out: torch.Tensor | None = None, block_d: int | None = None,
           block_nnz: int | None = None) -> torch.Tensor:
    """A^T @ D: [n_out, d] in D's dtype, out[cols[e]] += vals[e] * D[rows[e]], for D
    [batch, d] (any strides).

    Computed as spmm over the pattern sorted by latent (A^T in CSR), not by scattering with
    atomic adds: each output row is summed by one program, in a fixed order (deterministic,
    no [n_out, d] fp32 buffer to zero and cast, rows of unselected latents written as zeros in
    the same pass). The cost is an argsort of the nnz latents and uneven programs: a latent
    selected on many rows is one long loop (batch x BLOCK_D multiply-adds at most).
    `transposed`: transpose_pattern(cols, n_out) when the caller has it already (sparse.py
    builds it once per step, for the encoder's and the decoder's gradient)."""
    _require(rows, cols, vals, D)
    order, crow_t = transposed if transposed is not None else transpose_pattern(cols, n_out)
    assert crow_t.numel() == n_out + 1
    return spmm(crow_t, rows[order], vals[order], D, out=out, block_d=block_d,
                block_nnz=block_nnz)
