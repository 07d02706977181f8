"""Where an example row's text comes from: its window of tokens in the store's packed sequences
(`sequences[seq_index, position - BEFORE : position + AFTER + 1]`) and the store rows that hold
the other tokens of that window (for their activations), among the rows read.

Positions that were not cached (a BOS, --drop-special, --first-position) or whose rows were not
read (`--rows` below the store's rows) have no row: the browser shows them unshaded. A store
without sequences (`cache-acts import`, or written before stores kept them) gives each example
its own token only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.store import Store

BEFORE, AFTER = 24, 6  # tokens shown before and after an example's token


@dataclass
class Windows:
    """The windows of the example rows `rows` [E] (sorted, unique)."""

    rows: np.ndarray  # [E] int64 store rows
    tokens: np.ndarray  # [E, W] int64 token ids, -1 past the sequence's ends
    row_of: np.ndarray  # [E, W] int64 the store row holding each token, -1 when none was read
    center: np.ndarray  # [E] int64 the example token's index in its window

    def index(self, rows: np.ndarray) -> np.ndarray:
        """Window index of each of `rows` (all in self.rows)."""
        return np.searchsorted(self.rows, rows)


def read_meta(store: Store, name: str, rows: np.ndarray) -> np.ndarray:
    """Values of metadata array `name` at sorted unique `rows`."""
    return np.asarray(store.array(name).get_orthogonal_selection((rows,)), dtype=np.int64)


def example_windows(store: Store, rows: np.ndarray, n_rows: int) -> Windows:
    """The windows of example rows `rows` (sorted, unique, < n_rows)."""
    width = BEFORE + AFTER + 1
    e = len(rows)
    token_ids = read_meta(store, "token_ids", rows)
    if not store.has_sequences:
        tokens = np.full((e, width), -1, dtype=np.int64)
        row_of = np.full((e, width), -1, dtype=np.int64)
        tokens[:, 0], row_of[:, 0] = token_ids, rows  # windows are left-aligned
        return Windows(rows, tokens, row_of, np.zeros(e, dtype=np.int64))
    ctx = store.manifest.context_size
    seq = read_meta(store, "seq_index", rows)
    pos = read_meta(store, "position", rows)
    seqs = sorted_unique(seq)
    inverse = np.searchsorted(seqs, seq)
    text = store.read_sequences(seqs)[inverse]  # [E, ctx]
    # window [pos - BEFORE, pos + AFTER] clipped to the sequence, left-aligned in W slots
    start = np.maximum(pos - BEFORE, 0)
    offsets = start[:, None] + np.arange(width)[None]  # [E, W] positions
    inside = offsets <= np.minimum(pos + AFTER, ctx - 1)[:, None]
    tokens = np.where(inside, np.take_along_axis(text, np.minimum(offsets, ctx - 1), 1), -1)
    keys = np.where(inside, seq[:, None] * ctx + offsets, -1)
    row_of = _rows_of_keys(store, n_rows, keys)
    center = pos - start
    assert np.array_equal(tokens[np.arange(e), center], token_ids), "sequences disagree with rows"
    return Windows(rows, tokens.astype(np.int64), row_of, center)


def _rows_of_keys(store: Store, n_rows: int, keys: np.ndarray) -> np.ndarray:
    """The row among [0, n_rows) holding each (seq * ctx + position) key [...], -1 for none
    (keys -1 stay -1). Reads seq_index and position of those rows (16 bytes a row)."""
    ctx = store.manifest.context_size
    step = max(store.manifest.chunk_rows, 1 << 20)
    have = np.empty(n_rows, dtype=np.int64)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        have[lo:hi] = (np.asarray(store.array("seq_index")[lo:hi], dtype=np.int64) * ctx
                       + np.asarray(store.array("position")[lo:hi], dtype=np.int64))
    order = np.argsort(have, kind="stable")
    ordered = have[order]
    at = np.minimum(np.searchsorted(ordered, keys), n_rows - 1)
    found = (keys >= 0) & (ordered[at] == keys)
    return np.where(found, order[at], -1)


def shading_pairs(windows: Windows, example_rows: np.ndarray, latents: np.ndarray,
                  d_sae: int) -> np.ndarray:
    """Sorted unique keys (row * d_sae + latent) of every read token in the windows of the
    examples (example_rows [n], latents [n]) of one member: the activations pass 2 computes."""
    parts = [np.zeros(0, dtype=np.int64)]
    for lo in range(0, len(example_rows), 1 << 16):  # in blocks: [n, W] temporaries stay small
        row_of = windows.row_of[windows.index(example_rows[lo:lo + (1 << 16)])]  # [b, W]
        valid = row_of >= 0
        lat = np.broadcast_to(latents[lo:lo + (1 << 16), None], row_of.shape)
        parts.append(sorted_unique(row_of[valid] * d_sae + lat[valid]))
    return sorted_unique(np.concatenate(parts))


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique of a 1-d array by one sort (numpy 2.4's np.unique of int64 is ~20x slower)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if len(a) else a


def lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == want (keys sorted); NaN where absent (want -1 included)."""
    if len(keys) == 0:
        return np.full(want.shape, np.nan, dtype=np.float32)
    at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    return np.where((want >= 0) & (keys[at] == want), values[at], np.nan).astype(np.float32)
