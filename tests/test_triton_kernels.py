"""The Triton kernels of the sparse step (train_sae/dictionaries/triton_kernels.py) against torch:
each primitive equals the dense / torch.sparse product to float tolerance on TopK patterns (k per
row) and BatchTopK patterns (variable per row, empty rows), odd sizes, fp32 and bf16; the
autograd functions of sparse.py rebuilt on the kernels give the same values and gradients; and
the kernels compile for a GPU (sm_90 cubin, no device needed).

The kernel checks (`check_*`) run on CPU in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported in a process: triton builds its language
functions for the compiler or the interpreter at import, and other tests (torch.compile) may
import it first. So `test_the_kernels_equal_torch_in_the_interpreter` runs them in a pytest
subprocess with the variable set, and the variable never reaches the rest of the suite. Run them
alone with: TRITON_INTERPRET=1 pytest -o python_functions='check_*' tests/test_triton_kernels.py
Sizes stay tiny: the interpreter runs every program in numpy."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the triton kernel path needs `pip install triton`")

from train_sae.dictionaries import sparse  # noqa: E402
from train_sae.dictionaries import triton_kernels as tk  # noqa: E402

BATCH, D_SAE, D = 7, 23, 21  # D: not a multiple of the 16-wide test blocks (a block and a tail)
BLOCKS = {"block_d": 16, "block_nnz": 4}  # small blocks: rows of k = 6 take two entry blocks


def topk(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK: 6 latents in every row."""
    pre = torch.randn(BATCH, D_SAE, generator=torch.Generator().manual_seed(seed))
    return sparse.topk_pattern(pre, 6)


def batchtopk(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK: the 6 x batch largest over the batch, rows 1 and 4 empty, others uneven."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(BATCH, D_SAE, generator=g) + 2 * torch.rand(BATCH, 1, generator=g)
    pre[[1, 4]] = -10.0
    mask = pre >= pre.flatten().topk(6 * BATCH).values[-1]
    return sparse.mask_pattern(mask)


PATTERNS = {"topk": topk, "batchtopk": batchtopk}


def pattern(kind: str, seed: int = 0):
    """(crow, cols, rows) of a [BATCH, D_SAE] pattern."""
    crow, cols = PATTERNS[kind](seed)
    rows = torch.repeat_interleave(torch.arange(BATCH), crow[1:] - crow[:-1])
    if kind == "batchtopk":  # the pattern really is what the test says it is
        counts = crow[1:] - crow[:-1]
        assert counts[1] == counts[4] == 0 and len(set(counts.tolist())) > 2
    return crow, cols, rows


def dense(crow, cols, rows, vals) -> torch.Tensor:
    """The [BATCH, D_SAE] matrix of the pattern, in float64."""
    out = torch.zeros(BATCH, D_SAE, dtype=torch.float64)
    out[rows, cols] = vals.double()
    return out


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(actual, expected_f64, dtype):
    """actual (in `dtype`) equals the float64 reference rounded to `dtype`: fp32 to summation
    order, bf16 to one rounding of the output."""
    assert actual.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}
    torch.testing.assert_close(actual, expected_f64.to(dtype), **tol)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [(p, d) for p in PATTERNS for d in DTYPES]


@pytest.mark.parametrize("kind,dtype", CASES)
def check_spmm_equals_the_dense_product(kind, dtype):
    dtype = DTYPES[dtype]
    crow, cols, rows = pattern(kind)
    vals, W = randn(cols.numel(), dtype=dtype), randn(D_SAE, D, dtype=dtype, seed=2)
    expected = dense(crow, cols, rows, vals) @ W.double()
    close(tk.spmm(crow, cols, vals, W, **BLOCKS), expected, dtype)
    close(tk.spmm(crow, cols, vals, W), expected, dtype)  # the default blocks
    # a transposed view (W_enc.t() for dL/dx) and a strided output
    out = torch.empty(D, BATCH, dtype=dtype).t()
    got = tk.spmm(crow, cols, vals, W.t().contiguous().t(), out=out, **BLOCKS)
    assert got is out
    close(out, expected, dtype)
    if kind == "batchtopk":
        assert (got[[1, 4]] == 0).all()  # empty rows are written, as zeros


@pytest.mark.parametrize("kind,dtype", CASES)
def check_sddmm_equals_the_sampled_dense_product(kind, dtype):
    dtype = DTYPES[dtype]
    crow, cols, rows = pattern(kind)
    G, W = randn(BATCH, D, dtype=dtype), randn(D_SAE, D, dtype=dtype, seed=2)
    expected = (G.double() @ W.double().t())[rows, cols]
    close(tk.sddmm(rows, cols, G, W, **BLOCKS), expected, dtype)
    close(tk.sddmm(rows, cols, G, W), expected, dtype)
    close(tk.sddmm(rows, cols, G.t().contiguous().t(), W.t().contiguous().t(), **BLOCKS),
          expected, dtype)
    ones = torch.ones(1, 1, dtype=dtype).expand(BATCH, D)  # stride 0: the gradient of a sum
    close(tk.sddmm(rows, cols, ones, W, **BLOCKS), W.double().sum(1)[cols], dtype)


@pytest.mark.parametrize("kind,dtype", CASES)
def check_spmm_t_equals_the_transposed_product(kind, dtype):
    dtype = DTYPES[dtype]
    crow, cols, rows = pattern(kind)
    vals, X = randn(cols.numel(), dtype=dtype), randn(BATCH, D, dtype=dtype, seed=2)
    expected = dense(crow, cols, rows, vals).t() @ X.double()
    assert (expected.abs().sum(1) == 0).any(), "some latent is never selected: its row is zeros"
    close(tk.spmm_t(rows, cols, vals, X, D_SAE, **BLOCKS), expected, dtype)
    transposed = tk.transpose_pattern(cols, D_SAE)
    close(tk.spmm_t(rows, cols, vals, X, D_SAE, transposed=transposed), expected, dtype)
    # written straight into a [D, D_SAE] row-major buffer, as dL/dW_enc is laid out
    out = torch.empty(D, D_SAE, dtype=dtype).t()
    tk.spmm_t(rows, cols, vals, X, D_SAE, out=out, **BLOCKS)
    close(out, expected, dtype)


def check_mixed_dtypes_accumulate_in_fp32():
    """bf16 values on fp32 weights (and the reverse): fp32 accumulation, output in W's dtype."""
    crow, cols, rows = pattern("topk")
    vals, W = randn(cols.numel()).bfloat16(), randn(D_SAE, D, seed=2)
    close(tk.spmm(crow, cols, vals, W, **BLOCKS), dense(crow, cols, rows, vals) @ W.double(),
          torch.float32)
    G = randn(BATCH, D, seed=3).bfloat16()
    close(tk.sddmm(rows, cols, G, W, **BLOCKS), (G.double() @ W.double().t())[rows, cols],
          torch.float32)


def check_the_products_sparse_py_uses_agree():
    """The exact torch.sparse calls of sparse.py's _Decode give what the kernels give."""
    crow, cols, rows = pattern("batchtopk")
    vals, W, g = randn(cols.numel()), randn(D_SAE, D, seed=2), randn(BATCH, D, seed=3)
    acts = sparse.SparseActs(crow, cols, vals, (BATCH, D_SAE))
    torch.testing.assert_close(tk.spmm(crow, cols, vals, W), acts.csr(vals) @ W)
    sampled = torch.sparse.sampled_addmm(acts.csr(torch.zeros_like(vals)), g, W.t(), beta=0.0)
    torch.testing.assert_close(tk.sddmm(rows, cols, g, W), sampled.values())
    torch.testing.assert_close(tk.spmm_t(rows, cols, vals, g, D_SAE), acts.csr_t(vals) @ g)


def check_an_empty_pattern():
    crow = torch.zeros(BATCH + 1, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    W, X = randn(D_SAE, D), randn(BATCH, D)
    assert (tk.spmm(crow, none, torch.zeros(0), W) == 0).all()
    assert tk.sddmm(none, none, X, W).shape == (0,)
    assert (tk.spmm_t(none, none, torch.zeros(0), X, D_SAE) == 0).all()


# ---- autograd: sparse.py's step with its products on the kernels (SparseActs.backend) --------

def sparse_step(kind: str, on_kernels: bool):
    """One TopK-family forward and backward (ReLU of the selected pre-activations, decode, MSE
    to a target): the output and the gradients of x, W_enc, b_enc, W_dec."""
    d_in, d_out = 19, D
    x = randn(BATCH, d_in, seed=4).requires_grad_()
    W_enc = randn(d_in, D_SAE, seed=5).requires_grad_()
    b_enc = randn(D_SAE, seed=6).requires_grad_()
    W_dec = randn(D_SAE, d_out, seed=7).requires_grad_()
    target = randn(BATCH, d_out, seed=8)
    with torch.no_grad():
        pre = x @ W_enc + b_enc
    crow, cols, _ = pattern(kind)
    acts = sparse.SparseActs(crow, cols, torch.zeros(0), (BATCH, D_SAE),
                             "triton" if on_kernels else "torch")
    vals = torch.relu(sparse._GatherPre.apply(x, W_enc, b_enc, pre, acts))
    y = sparse._Decode.apply(vals, W_dec, acts)
    ((y - target) ** 2).sum().backward()
    return y.detach(), {"x": x.grad, "W_enc": W_enc.grad, "b_enc": b_enc.grad,
                        "W_dec": W_dec.grad}


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def check_the_sparse_step_on_the_kernels_equals_the_torch_one(kind):
    y_torch, grads_torch = sparse_step(kind, False)
    y_triton, grads_triton = sparse_step(kind, True)
    torch.testing.assert_close(y_triton, y_torch, rtol=1e-5, atol=1e-5)
    for name, grad in grads_torch.items():
        assert grad.abs().sum() > 0, name  # every gradient is exercised
        assert grads_triton[name].stride() == grad.stride(), name
        torch.testing.assert_close(grads_triton[name], grad, rtol=1e-5, atol=1e-5, msg=name)


DICTIONARIES = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4},
                "transcoder": {"k": 4}}


def trained(arch: str, params: dict, backend: str, steps: int = 8) -> dict[str, torch.Tensor]:
    """A dictionary's weights after `steps` Adam steps of the sparse step with `backend`, with
    every latent dead from the start (so AuxK's sparse path runs too)."""
    from train_sae.dictionaries import IO, TrainProgress, build

    io = IO.of({"a": 12}, {"b": 10}) if arch == "transcoder" else IO.same({"a": 12})
    model = build(arch, io, 64, dict(params, dead_tokens_threshold=1), 0)
    model.sparse_kernels, model.sparse_backend = True, backend
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = randn(BATCH, 12, seed=9), randn(BATCH, 10, seed=10)
    for i in range(steps):
        out = model.training_forward(x, TrainProgress(i, steps, i * BATCH),
                                     y if arch == "transcoder" else None)
        opt.zero_grad()
        out.loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", sorted(DICTIONARIES))
def check_a_dictionary_trains_the_same_on_the_kernels(arch):
    on_torch = trained(arch, DICTIONARIES[arch], "torch")
    on_triton = trained(arch, DICTIONARIES[arch], "triton")
    for name, value in on_torch.items():
        torch.testing.assert_close(on_triton[name], value, rtol=1e-4, atol=1e-5, msg=name)


# ---- run in the main process: the interpreter subprocess, unavailability, the GPU build --------

def test_the_kernels_equal_torch_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
         "-o", "addopts=", "-o", "python_functions=check_*", __file__],
        cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    checks = 3 * len(CASES) + 3 + len(PATTERNS) + len(DICTIONARIES)  # all ran, none skipped
    assert passed and int(passed.group(1)) == checks and "skipped" not in run.stdout, run.stdout


def test_unavailable_says_why(monkeypatch):
    crow, cols, rows = pattern("topk")
    W = randn(D_SAE, D)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not tk.available()
    with pytest.raises(tk.TritonUnavailable, match="needs a CUDA device; use --kernels torch"):
        tk.spmm(crow, cols, torch.ones(cols.numel()), W)
    monkeypatch.setattr(tk, "triton", None)
    assert tk.unavailable_reason() == ("--kernels triton needs the triton package "
                                       "(pip install triton); use --kernels torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU but no triton
    assert not tk.available()


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tk.available()
    crow, cols, rows = pattern("topk")
    with pytest.raises(tk.TritonUnavailable, match="runs on CUDA tensors, got tensors on cpu"):
        tk.sddmm(rows, cols, randn(BATCH, D), randn(D_SAE, D))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_kernels_compile_for_a_gpu(monkeypatch, dtype):
    """Triton lowers both kernels to an sm_90 cubin (its bundled ptxas; no GPU needed): what the
    interpreter accepts but the compiler would not (types, loop bounds) fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = tk._kernels()
    i64, ptr = "*i64", f"*{dtype}"
    spmm = {"crow": i64, "cols": i64, "vals": ptr, "W": ptr, "out": ptr, "d": "i32",
            "stride_w0": "i32", "stride_w1": "i32", "stride_o0": "i32", "stride_o1": "i32"}
    sddmm = {"rows": i64, "cols": i64, "G": ptr, "W": ptr, "out": ptr, "nnz": "i32", "d": "i32",
             "stride_g0": "i32", "stride_g1": "i32", "stride_w0": "i32", "stride_w1": "i32"}
    blocks = {"BLOCK_NNZ": tk.SPMM_BLOCK_NNZ, "BLOCK_D": 128}
    for fn, signature, nnz in ((kernels.spmm, spmm, tk.SPMM_BLOCK_NNZ),
                               (kernels.sddmm, sddmm, tk.SDDMM_BLOCK_NNZ)):
        constexprs = {**blocks, "BLOCK_NNZ": nnz}
        src = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                        constexprs=constexprs)
        binary = compile(src, target=GPUTarget("cuda", 90, 32), options=tk._LAUNCH)
        assert len(binary.asm["cubin"]) > 0
