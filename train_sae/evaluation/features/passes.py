"""The passes over the store's rows that feed the feature browser, shared by every member.

Pass 1 (`collect`) reads rows [0, n_rows) once, chunk by chunk (each chunk's CRC32 checked as
the trainer's loader does), encodes them with every member and feeds each member's
LatentCollector. Pass 2 (`context_acts`) reads the same rows again and encodes only the rows
that hold a token shown around some example, for the latents whose examples show it: the store
is shuffled, so the activations of an example's neighbouring tokens are in other rows. Both are
linear in the rows read; memory is the collectors plus the (row, latent) pairs to shade.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from shared.store import Store, from_storage
from train_sae.evaluation.features.collect import LatentCollector, LatentStats
from train_sae.evaluation.features.contexts import sorted_unique
from train_sae.evaluation.features.members import FeatureMember
from train_sae.training.loader import ChunkVerifier


def read_blocks(store: Store, hooks: list[str], n_rows: int, desc: str, device: torch.device,
                wanted: np.ndarray | None = None
                ) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(first row, last row + 1, {hook: [rows, d] float32 on device}) for each row chunk of
    [0, n_rows), whole chunks read and checked; with `wanted` (sorted row indices), only the
    chunks holding one of them are read."""
    m = store.manifest
    verifier = ChunkVerifier(store)
    n_chunks = -(-n_rows // m.chunk_rows)
    chunks = range(n_chunks) if wanted is None else sorted_unique(wanted // m.chunk_rows).tolist()
    for c in tqdm(chunks, desc=desc, unit="chunk", file=sys.stderr, dynamic_ncols=True,
                  disable=None):
        lo = c * m.chunk_rows
        hi = min(lo + m.chunk_rows, m.n_rows)
        batch = {}
        for hook in hooks:
            raw = store.acts(hook)[lo:hi]
            verifier.check(hook, c, raw)
            batch[hook] = from_storage(raw[:n_rows - lo], m.dtype).to(device, torch.float32)
        yield lo, min(hi, n_rows), batch


def store_hooks(members: list[FeatureMember]) -> list[str]:
    return list(dict.fromkeys(h for m in members for h in m.store_inputs))


@torch.no_grad()
def collect(store: Store, members: list[FeatureMember], n_rows: int, top: int, samples: int,
            batch_size: int, device: torch.device, seed: int = 0) -> list[LatentStats]:
    """Pass 1: every member's LatentStats over rows [0, n_rows)."""
    collectors = [LatentCollector(m.d_sae, top, samples, device, seed) for m in members]
    for lo, hi, batch in read_blocks(store, store_hooks(members), n_rows,
                                     "features pass 1/2 top examples", device):
        for start in range(0, hi - lo, batch_size):
            part = {h: x[start:start + batch_size] for h, x in batch.items()}
            for member, collector in zip(members, collectors, strict=True):
                collector.add(member.encode(part), lo + start)
    return [c.result() for c in collectors]


@torch.no_grad()
def context_acts(store: Store, members: list[FeatureMember], n_rows: int,
                 pairs: list[np.ndarray], batch_size: int, device: torch.device
                 ) -> list[np.ndarray]:
    """Pass 2: for each member, the activation [P] of each (row, latent) pair of its sorted
    unique keys `pairs[i]` (key = row * d_sae + latent, rows < n_rows)."""
    rows_needed = [k // m.d_sae for k, m in zip(pairs, members, strict=True)]
    out = [np.zeros(len(k), dtype=np.float32) for k in pairs]
    every = sorted_unique(np.concatenate([np.zeros(0, np.int64), *rows_needed]))
    if len(every) == 0:
        return out
    for lo, hi, batch in read_blocks(store, store_hooks(members), n_rows,
                                     "features pass 2/2 context", device, wanted=every):
        for i, member in enumerate(members):
            rows = rows_needed[i]
            a, b = np.searchsorted(rows, [lo, hi])
            if a == b:
                continue
            local = rows[a:b] - lo  # [p] sorted
            first = np.concatenate(([True], local[1:] != local[:-1]))
            uniq, inverse = local[first], np.cumsum(first) - 1
            latents = torch.from_numpy(pairs[i][a:b] % member.d_sae).to(device)
            which = torch.from_numpy(inverse).to(device)
            picked = torch.from_numpy(uniq).to(device)
            for s in range(0, len(uniq), batch_size):
                sub = {h: x[picked[s:s + batch_size]] for h, x in batch.items()}
                acts = member.encode(sub)  # [<= batch_size, d_sae]
                mask = (which >= s) & (which < s + batch_size)
                vals = acts[which[mask] - s, latents[mask]]
                idx = torch.nonzero(mask).squeeze(1).cpu().numpy()
                out[i][a + idx] = vals.float().cpu().numpy()
    return out
