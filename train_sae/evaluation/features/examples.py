"""A member's examples as the latent pages show them, computed for every latent at once (a 16k
latent member has ~850k examples: one vectorised lookup, then one formatted line each).

An example is {"row": store row, "act": its activation, "c": the example token's index in "t",
"t": the window's token ids, "a": each token's activation of that latent (null: the position
was not cached or its row not read)}.
"""

from __future__ import annotations

import numpy as np

from train_sae.evaluation.features import contexts

BLOCK = 1 << 16  # examples formatted at once


def fmt(x: float) -> str:
    """A number as the pages store it: 5 significant digits, null for NaN."""
    return "null" if x != x else "%.5g" % x  # noqa: UP031 - %-format is the fast one here


def examples_json(values: np.ndarray, rows: np.ndarray, windows: contexts.Windows,
                  keys: np.ndarray, acts: np.ndarray, d_sae: int, first: int = 0
                  ) -> list[list[str]]:
    """values, rows [k, n] of latents first..first+n-1 (row -1 = no example) -> per latent the
    JSON text of its examples, in row order of the table. `keys`, `acts`: the member's pass-2
    activations (sorted keys row * d_sae + latent)."""
    k, shown = rows.shape
    ok = rows >= 0
    latent = np.broadcast_to(np.arange(first, first + shown), rows.shape)[ok]
    r, v = rows[ok], values[ok]
    out: list[list[str]] = [[] for _ in range(shown)]
    for lo in range(0, len(r), BLOCK):  # a block at a time: Python floats cost 24 bytes each
        _format(out, latent[lo:lo + BLOCK], r[lo:lo + BLOCK], v[lo:lo + BLOCK], windows, keys,
                acts, d_sae, first)
    return out


def _format(out: list[list[str]], latent: np.ndarray, r: np.ndarray, v: np.ndarray,
            windows: contexts.Windows, keys: np.ndarray, acts: np.ndarray, d_sae: int,
            first: int) -> None:
    w = windows.index(r)
    row_of, tokens, center = windows.row_of[w], windows.tokens[w], windows.center[w]
    shade = contexts.lookup(keys, acts, np.where(row_of >= 0, row_of * d_sae + latent[:, None],
                                                 -1))
    shade[np.arange(len(r)), center] = v  # the example's own value, as pass 1 ranked it
    lengths = (tokens >= 0).sum(1)
    for lat, row, val, c, n, t, a in zip(latent.tolist(), r.tolist(), v.tolist(),
                                         center.tolist(), lengths.tolist(), tokens.tolist(),
                                         shade.tolist(), strict=True):
        out[lat - first].append(f'{{"row":{row},"act":{val!r},"c":{c},"t":[{",".join(map(str, t[:n]))}],'
                        f'"a":[{",".join(fmt(x) for x in a[:n])}]}}')


def quantile_tables(values: np.ndarray, rows: np.ndarray, groups: int
                    ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """Sampled examples (values, rows [s, shown], row -1 = none) sorted by activation per latent
    (highest first, empty slots last), and per latent the [start, stop) of each of `groups`
    equal-count quantile groups (as numpy.array_split cuts them; empty groups left out)."""
    key = np.where(rows >= 0, values, -np.inf)
    order = np.argsort(-key, axis=0, kind="stable")
    values = np.take_along_axis(values, order, 0)
    rows = np.take_along_axis(rows, order, 0)
    bounds = []
    for n in (rows >= 0).sum(0).tolist():
        sizes = [n // groups + (1 if g < n % groups else 0) for g in range(groups)]
        edges = np.cumsum([0, *sizes]).tolist()
        bounds.append([(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a])
    return values, rows, bounds
