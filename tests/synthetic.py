"""Synthetic activations with known ground truth, for tests and benchmarks.

`make_sparse_data` plants `n_directions` unit vectors in `d_in` dimensions (more directions than
dimensions gives superposition) and draws each row as a sparse non-negative combination of them
plus a little Gaussian noise. A good SAE trained on such rows should find decoder rows close to
the planted directions: `mean_max_cosine` measures that. `make_paired_data` plants features in
one of two hooks or in both (for crosscoders). `write_synthetic_store` / `write_multihook_store`
write rows as a complete activation store, so the training side can be tested without a
language model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.errors import fail
from shared.store import (
    META_ARRAYS,
    HookStats,
    Manifest,
    Store,
    acts_path,
    check_dtype,
    checksum,
    create_store,
    default_shard_rows,
    from_storage,
    open_store,
    to_storage,
    write_manifest,
)


def make_sparse_data(
    n_rows: int,
    d_in: int,
    n_directions: int,
    n_active: float,
    seed: int,
    *,
    magnitude: tuple[float, float] = (0.5, 1.5),
    noise: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sparse non-negative mixtures of known unit directions.

    Each direction fires independently in each row with probability `n_active / n_directions`
    (so `n_active` is the mean number of active directions per row), with a magnitude uniform in
    `magnitude`; Gaussian noise of std `noise` per coordinate is added.

    Returns (x [n_rows, d_in] float32, directions [n_directions, d_in] unit rows).
    """
    if n_rows < 1 or d_in < 1 or n_directions < 1:
        fail(f"n_rows, d_in and n_directions must be >= 1 (got {n_rows}, {d_in}, {n_directions})")
    if not 0 < n_active <= n_directions:
        fail(f"n_active must be in (0, n_directions={n_directions}] (got {n_active})")
    lo, hi = magnitude
    if not 0 <= lo <= hi:
        fail(f"magnitude must be a range 0 <= low <= high (got {magnitude})")
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d_in, generator=gen)  # [n_dirs, d_in]
    directions /= directions.norm(dim=1, keepdim=True)
    fires = torch.rand(n_rows, n_directions, generator=gen) < n_active / n_directions
    size = lo + (hi - lo) * torch.rand(n_rows, n_directions, generator=gen)
    coeffs = fires * size  # [n_rows, n_dirs]
    x = coeffs @ directions + noise * torch.randn(n_rows, d_in, generator=gen)
    return x.float(), directions


def mean_max_cosine(W_dec: torch.Tensor, directions: torch.Tensor) -> float:
    """For each true direction, the best cosine with any decoder row; averaged over directions.

    W_dec: [d_sae, d_in], directions: [n_dirs, d_in].
    """
    dec = W_dec.detach().float()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dirs = directions.detach().float().to(dec.device)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = dirs @ dec.T  # [n_dirs, d_sae]
    return cos.max(dim=1).values.mean().item()


def make_paired_data(n_rows: int, d_hook: int, n_each: int, fire_prob: float, seed: int,
                     *, magnitude: tuple[float, float] = (0.5, 1.5), noise: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two hooks' rows with features planted in hook A only, hook B only, or both (the
    crosscoder model-diffing case).

    `n_each` features of each kind; a shared feature has its own unit direction in each hook and
    fires in both with the same magnitude. Each feature fires independently with probability
    `fire_prob`, magnitude uniform in `magnitude`; Gaussian noise of std `noise` per coordinate
    is added (without it, rows where no feature fires are exactly zero). Returns (x_a [n_rows, d_hook],
    x_b [n_rows, d_hook], features [3 * n_each, 2 * d_hook]: rows A-only, then B-only, then
    shared, each the feature's concatenated [A | B] direction).
    """
    if n_rows < 1 or d_hook < 1 or n_each < 1:
        fail(f"n_rows, d_hook and n_each must be >= 1 (got {n_rows}, {d_hook}, {n_each})")
    if not 0 < fire_prob <= 1:
        fail(f"fire_prob must be in (0, 1] (got {fire_prob})")
    g = torch.Generator().manual_seed(seed)

    def unit(n: int) -> torch.Tensor:
        v = torch.randn(n, d_hook, generator=g)
        return v / v.norm(dim=1, keepdim=True)

    features = torch.zeros(3 * n_each, 2 * d_hook)
    a_only, b_only, shared = (slice(i * n_each, (i + 1) * n_each) for i in range(3))
    features[a_only, :d_hook] = unit(n_each)
    features[b_only, d_hook:] = unit(n_each)
    features[shared, :d_hook] = unit(n_each)
    features[shared, d_hook:] = unit(n_each)  # its own direction in hook B
    on = torch.rand(n_rows, 3 * n_each, generator=g) < fire_prob
    lo, hi = magnitude
    size = lo + (hi - lo) * torch.rand(n_rows, 3 * n_each, generator=g)
    x = (on * size) @ features  # [n_rows, 2 * d_hook]
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=g)
    return x[:, :d_hook].contiguous(), x[:, d_hook:].contiguous(), features


def write_synthetic_store(
    path: str | Path,
    x: torch.Tensor,
    hook: str = "synthetic",
    seed: int = 0,
    chunk_rows: int = 1024,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Store:
    """Write rows `x` [n_rows, d_in] (i.i.d., hence already shuffled) as a complete one-hook
    store (see `write_multihook_store`). Returns the opened store."""
    return write_multihook_store(path, {hook: x}, seed, chunk_rows, dtype=dtype,
                                 overwrite=overwrite)


def write_multihook_store(
    path: str | Path,
    xs: dict[str, torch.Tensor],
    seed: int = 0,
    chunk_rows: int = 1024,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Store:
    """Write `xs` {hook: [n_rows, d_hook]} (rows aligned: row i of every hook is one token) as
    a complete store.

    Statistics (mean, mean_norm) are computed from the values as stored (after any dtype
    rounding); one CRC32 per row chunk is recorded for every array. The manifest is marked
    complete only after all arrays are written. Returns the opened store.
    """
    check_dtype(dtype)
    if not xs:
        fail("a synthetic store needs at least one hook")
    for hook, x in xs.items():
        if x.ndim != 2 or x.shape[0] < 1:
            fail(f"synthetic rows of {hook!r} must be a non-empty [n_rows, d_in] matrix "
                 f"(got shape {tuple(x.shape)})")
    n_rows = {x.shape[0] for x in xs.values()}
    if len(n_rows) != 1:
        fail(f"every hook needs the same number of rows (aligned tokens), got {sorted(n_rows)}")
    if chunk_rows < 1:
        fail(f"chunk_rows must be >= 1 (got {chunk_rows})")
    (n,) = n_rows
    manifest = Manifest(
        model="synthetic",
        hooks=list(xs),
        d_in={h: x.shape[1] for h, x in xs.items()},
        dtype=dtype,
        n_rows=n,
        context_size=1,
        seed=seed,
        chunk_rows=chunk_rows,
        shard_rows=default_shard_rows(chunk_rows, {h: x.shape[1] for h, x in xs.items()}, dtype,
                                      n),
        dataset={"kind": "synthetic"},
    )
    if Path(path).exists() and not overwrite:
        fail(f"{path} already exists; choose another path or pass overwrite=True")
    group = create_store(path, manifest, overwrite=overwrite)

    arrays: dict[str, np.ndarray] = {
        "token_ids": np.zeros(n, dtype=META_ARRAYS["token_ids"]),
        "seq_index": np.arange(n, dtype=META_ARRAYS["seq_index"]),
        "position": np.zeros(n, dtype=META_ARRAYS["position"]),
    }
    for hook, x in xs.items():
        stored = to_storage(x, dtype)  # numpy, storage dtype
        values = from_storage(stored, dtype).double()  # [n_rows, d_in] what readers will see
        arrays[acts_path(hook)] = stored
        manifest.stats[hook] = HookStats(
            mean=values.mean(dim=0).tolist(), mean_norm=values.norm(dim=1).mean().item()
        )
    for name, data in arrays.items():
        group[name][...] = data
        manifest.checksums[name] = [
            checksum(data[start : start + chunk_rows]) for start in range(0, n, chunk_rows)
        ]
    manifest.complete = True
    write_manifest(group, manifest)
    return open_store(path)


def build_crosscoder(arch: str, splits: list[int], hooks: list[str], d_sae: int, params: dict,
                     seed: int):
    """A crosscoder over `hooks` of widths `splits` through the one registry."""
    from train_sae.dictionaries import IO, build

    if len(hooks) != len(splits):
        fail(f"got {len(hooks)} hook names for {len(splits)} splits; give one d_in per hook")
    pairs = tuple(zip(hooks, splits, strict=True))
    return build(arch, IO(pairs, pairs), d_sae, params, seed)
