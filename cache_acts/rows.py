"""A batch of cached rows and the fixed-size record each row becomes in a bucket file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.store import META_ARRAYS, STORAGE_DTYPES, acts_path

# a record's global row index (its place in the source stream): pass 2 orders a bucket's rows by
# it, however many ranks scattered them; it is not written to the store
ROW_FIELD = "_row"


@dataclass
class RowBatch:
    """Rows from one source step, already in storage dtype; row i of every field is the same token.

    `cursor` is the source position just after this batch (sequences consumed for a model run,
    rows consumed for an import), so a resumed run restarts the source there. A model run also
    carries the packed sequences its rows come from (`sequences`, sequence `first_sequence` on),
    which the engine keeps as the store's `sequences` array.
    """

    acts: dict[str, np.ndarray]  # hook -> [n, d_in]
    token_ids: np.ndarray  # [n] int32
    seq_index: np.ndarray  # [n] int64
    position: np.ndarray  # [n] int32
    cursor: int
    sequences: np.ndarray | None = None  # [n_seq, context_size] int32, consecutive sequences
    first_sequence: int = 0  # the index of sequences[0]

    def __len__(self) -> int:
        return len(self.token_ids)

    def head(self, n: int) -> RowBatch:
        """The first n rows (the `--tokens` budget cuts the last batch), with the sequences
        they come from."""
        n = min(n, len(self))
        sequences = self.sequences
        if sequences is not None and n:
            sequences = sequences[:int(self.seq_index[n - 1]) - self.first_sequence + 1]
        return RowBatch(
            {h: a[:n] for h, a in self.acts.items()},
            self.token_ids[:n], self.seq_index[:n], self.position[:n], self.cursor,
            sequences, self.first_sequence,
        )


def record_dtype(hooks: list[str], d_in: dict[str, int], dtype: str) -> np.dtype:
    """One packed record per row: every hook's activations, the metadata arrays, then the global
    row index. Field names are the store's array paths (and ROW_FIELD), so pass 2 writes
    field -> array directly."""
    fields: list[tuple] = [(acts_path(h), STORAGE_DTYPES[dtype], (d_in[h],)) for h in hooks]
    fields += [(name, np.dtype(t).newbyteorder("<")) for name, t in META_ARRAYS.items()]
    fields.append((ROW_FIELD, np.dtype("<i8")))
    return np.dtype(fields)


def array_fields(rec: np.dtype) -> list[str]:
    """The fields of a record that are store arrays."""
    return [name for name in rec.names if name != ROW_FIELD]


def to_records(batch: RowBatch, rec: np.dtype, start: int) -> np.ndarray:
    """RowBatch whose first row is global row `start` -> structured array [n] of `rec`."""
    out = np.empty(len(batch), dtype=rec)
    out[ROW_FIELD] = np.arange(start, start + len(batch), dtype=np.int64)
    for hook, a in batch.acts.items():
        out[acts_path(hook)] = a
    out["token_ids"] = batch.token_ids
    out["seq_index"] = batch.seq_index
    out["position"] = batch.position
    return out
