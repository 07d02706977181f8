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


# --- planted structure for transcoders, CLTs and Matryoshka SAEs -----------------------------------
def _unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[n, d] random unit rows drawn from `gen`."""
    rows = torch.randn(n, d, generator=gen)
    return rows / rows.norm(dim=1, keepdim=True)


def _sparse_codes(n_rows: int, n_features: int, fire_prob: float, gen: torch.Generator,
                  magnitude: tuple[float, float]) -> torch.Tensor:
    """[n_rows, n_features] non-negative codes: each feature fires independently with
    probability `fire_prob`, with a magnitude uniform in `magnitude`."""
    lo, hi = magnitude
    if not 0 <= lo <= hi:
        fail(f"magnitude must be a range 0 <= low <= high (got {magnitude})")
    fires = torch.rand(n_rows, n_features, generator=gen) < fire_prob
    return fires * (lo + (hi - lo) * torch.rand(n_rows, n_features, generator=gen))


def make_transcoder_data(n_rows: int, d_in: int, d_out: int, n_features: int, n_active: float,
                         seed: int, *, magnitude: tuple[float, float] = (0.5, 1.5),
                         noise: float = 0.01, linear: float = 0.0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """An input hook and an output hook driven by the same sparse features (an MLP's input and
    output, for transcoders).

    Codes as `make_sparse_data` (each feature fires with probability n_active / n_features);
    x = codes @ dirs_in + Gaussian noise of std `noise`, y = codes @ dirs_out + x @ A^T, where
    dirs_in [n_features, d_in] and dirs_out [n_features, d_out] are random unit rows and A
    [d_out, d_in] is a random linear map with entries of std `linear / sqrt(d_in)` (zero when
    `linear` is 0: then y is the sparse part alone; a skip transcoder's W_skip should find A).

    Returns (x [n_rows, d_in], y [n_rows, d_out], dirs_in, dirs_out, A), all float32.
    """
    if n_rows < 1 or d_in < 1 or d_out < 1 or n_features < 1:
        fail(f"n_rows, d_in, d_out and n_features must be >= 1 (got {n_rows}, {d_in}, {d_out}, "
             f"{n_features})")
    if not 0 < n_active <= n_features:
        fail(f"n_active must be in (0, n_features={n_features}] (got {n_active})")
    gen = torch.Generator().manual_seed(seed)
    dirs_in = _unit_rows(n_features, d_in, gen)
    dirs_out = _unit_rows(n_features, d_out, gen)
    A = linear * torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    codes = _sparse_codes(n_rows, n_features, n_active / n_features, gen, magnitude)
    x = codes @ dirs_in + noise * torch.randn(n_rows, d_in, generator=gen)
    y = codes @ dirs_out + x @ A.T
    return x.float(), y.float(), dirs_in, dirs_out, A


def make_clt_data(n_rows: int, d_in: int, d_out: int, n_each: int, fire_prob: float, seed: int,
                  *, magnitude: tuple[float, float] = (0.5, 1.5), noise: float = 0.01
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor],
                             torch.Tensor]:
    """Two layers' inputs and outputs with features of three kinds (for cross-layer transcoders),
    `n_each` of each, every feature firing independently with probability `fire_prob`:

    - "early": read from layer 0's input, written to layer 0's output only;
    - "both": read from layer 0's input, written to layer 0's output and to layer 1's;
    - "late": read from layer 1's input, written to layer 1's output only.

    x0 = early @ E_early + both @ E_both, x1 = late @ E_late (each plus Gaussian noise of std
    `noise`); y0 = early @ F_early + both @ F_both, y1 = both @ G_both + late @ F_late, with every
    E, F, G random unit rows of its own.

    Returns ([x0, x1] each [n_rows, d_in], [y0, y1] each [n_rows, d_out], features, codes) where
    features = {"kind": [3 * n_each] 0 early / 1 both / 2 late, "enc": [3 * n_each, 2 * d_in]
    each feature's direction in [x0 | x1], "dec": [3 * n_each, 2 * d_out] in [y0 | y1]} and
    codes [n_rows, 3 * n_each] are the features' magnitudes in each row (0: not firing).
    """
    if n_rows < 1 or d_in < 1 or d_out < 1 or n_each < 1:
        fail(f"n_rows, d_in, d_out and n_each must be >= 1 (got {n_rows}, {d_in}, {d_out}, "
             f"{n_each})")
    if not 0 < fire_prob <= 1:
        fail(f"fire_prob must be in (0, 1] (got {fire_prob})")
    gen = torch.Generator().manual_seed(seed)
    n = 3 * n_each
    early, both, late = (slice(i * n_each, (i + 1) * n_each) for i in range(3))
    enc = torch.zeros(n, 2 * d_in)
    dec = torch.zeros(n, 2 * d_out)
    enc[early, :d_in] = _unit_rows(n_each, d_in, gen)
    enc[both, :d_in] = _unit_rows(n_each, d_in, gen)
    enc[late, d_in:] = _unit_rows(n_each, d_in, gen)
    dec[early, :d_out] = _unit_rows(n_each, d_out, gen)
    dec[both, :d_out] = _unit_rows(n_each, d_out, gen)
    dec[both, d_out:] = _unit_rows(n_each, d_out, gen)
    dec[late, d_out:] = _unit_rows(n_each, d_out, gen)
    codes = _sparse_codes(n_rows, n, fire_prob, gen, magnitude)
    x = codes @ enc + noise * torch.randn(n_rows, 2 * d_in, generator=gen)
    y = codes @ dec
    kind = torch.arange(n) // n_each
    return ([x[:, :d_in].contiguous(), x[:, d_in:].contiguous()],
            [y[:, :d_out].contiguous(), y[:, d_out:].contiguous()],
            {"kind": kind, "enc": enc, "dec": dec}, codes)


def make_hierarchical_data(n_rows: int, d_in: int, n_parents: int, n_children: int,
                           parent_prob: float, seed: int, *,
                           parent_magnitude: tuple[float, float] = (0.5, 1.5),
                           child_magnitude: tuple[float, float] = (0.5, 1.0),
                           noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with a two-level feature hierarchy (the case Matryoshka SAEs are made for).

    Each of `n_parents` parent features fires independently with probability `parent_prob`;
    whenever a parent fires, exactly one of its `n_children` children (chosen uniformly) fires
    with it, so a parent is `n_children` times as frequent as any child and never fires alone.
    A plain SAE tends to absorb the parent into its children's latents; a Matryoshka SAE's first
    group should keep it. x = sum of the active features' magnitudes times their random unit
    directions, plus Gaussian noise of std `noise`.

    Returns (x [n_rows, d_in], parents [n_parents, d_in], children [n_parents * n_children,
    d_in]; child j of parent p is row p * n_children + j).
    """
    if n_rows < 1 or d_in < 1 or n_parents < 1 or n_children < 1:
        fail(f"n_rows, d_in, n_parents and n_children must be >= 1 (got {n_rows}, {d_in}, "
             f"{n_parents}, {n_children})")
    if not 0 < parent_prob <= 1:
        fail(f"parent_prob must be in (0, 1] (got {parent_prob})")
    gen = torch.Generator().manual_seed(seed)
    parents = _unit_rows(n_parents, d_in, gen)
    children = _unit_rows(n_parents * n_children, d_in, gen)
    p_codes = _sparse_codes(n_rows, n_parents, parent_prob, gen, parent_magnitude)
    which = torch.randint(0, n_children, (n_rows, n_parents), generator=gen)
    lo, hi = child_magnitude
    size = lo + (hi - lo) * torch.rand(n_rows, n_parents, generator=gen)
    c_codes = torch.zeros(n_rows, n_parents, n_children)
    c_codes.scatter_(2, which[..., None], ((p_codes > 0) * size)[..., None])
    x = (p_codes @ parents + c_codes.reshape(n_rows, -1) @ children
         + noise * torch.randn(n_rows, d_in, generator=gen))
    return x.float(), parents, children
