"""`train-sae features`: build the static feature browser of a sweep (or one run) from its store.

1. the members to show (members.py) and the store they were trained on (as `train-sae eval`
   finds it: sweep.json's path or --store, checked by content);
2. pass 1 over the first `rows` store rows: every member's top examples, quantile samples,
   density, mean and histogram (collect.py, passes.py);
3. the text around each example from the store's `sequences` (contexts.py) and pass 2 for the
   activations of the tokens around it;
4. with the model at hand: token text, and each latent's promoted / suppressed tokens
   (logits.py);
5. the site (site.py): written to `<out>.partial`, then moved to `out`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import fail
from shared.fingerprint import same, short
from shared.models import LoadedModel, load_model
from shared.store import Store
from train_sae.evaluation.features import contexts, site
from train_sae.evaluation.features.collect import HIST_BINS, LatentStats
from train_sae.evaluation.features.examples import examples_json, fmt, quantile_tables
from train_sae.evaluation.features.logits import LogitTables, logit_tables
from train_sae.evaluation.features.members import FeatureMember, select_members
from train_sae.evaluation.features.passes import collect, context_acts

SAMPLES = 32  # uniformly sampled firing examples kept per latent ...
QUANTILE_GROUPS = 4  # ... shown in this many activation-quantile groups
LOGIT_TOKENS = 10  # rows of each logit table
LIST_TOKENS = 5  # distinct example tokens per latent in the searchable list
PAGE_BLOCK = 2048  # latent pages formatted at once (bounds the memory of the writing)


@dataclass
class FeatureOptions:
    out: Path | None = None  # default: <path>/features
    store: str | None = None  # where the store is now, if it moved
    storage_options: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None  # store rows to read (None: all)
    members: list[str] = field(default_factory=list)  # [] = every finished member
    latents: int | None = None  # pages for latents 0..latents-1 (None: all)
    top: int = 20  # top activating examples per latent
    model: str | None = None  # for token text and logit tables (default: the store's)
    batch_size: int = 1024
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when there is one)

    def __post_init__(self) -> None:
        for name in ("rows", "latents"):
            v = getattr(self, name)
            if v is not None and v < 1:
                fail(f"--{name} must be at least 1, got {v}")
        if self.top < 1:
            fail(f"--top must be at least 1, got {self.top}")
        if self.batch_size < 1:
            fail(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            fail(f"--device {self.device!r} is not cpu, cuda, cuda:N or auto")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {self.device} was asked for but no CUDA GPU is visible; use --device "
                 "cpu")


@dataclass
class Built:
    index: Path
    members: list[str]
    rows: int
    notes: list[str]


def build_features(path: Path, opts: FeatureOptions) -> Built:
    from train_sae.evaluation.eval_sweep import find_store, sweep_document

    path = Path(path)
    members = select_members(path, opts.members)
    doc = sweep_document(path)
    store = find_store(doc, opts.store, opts.storage_options)
    if store is None:
        where = doc.get("store")
        fail(f"the sweep's store {where} is not there any more; pass --store with where it is "
             "now (checked by content against the store it was trained on)" if where else
             f"{path} records no store; pass --store with the store it was trained on")
    _check_request(store, members, opts)
    n_rows = opts.rows or store.n_rows
    device = torch.device(opts.device)
    for m in members:
        m.model.to(device)
    out = opts.out or path / "features"
    site.check_out(out)
    loaded, notes = _model(store, opts, device)
    tmp = site.prepare_out(out)
    print(f"features: {len(members)} member(s) over {n_rows:,} of {store.n_rows:,} rows",
          file=sys.stderr)
    stats = collect(store, members, n_rows, opts.top, SAMPLES, opts.batch_size, device)
    shown = [min(opts.latents or m.d_sae, m.d_sae) for m in members]
    examples = [_examples(s, k) for s, k in zip(stats, shown, strict=True)]
    every = contexts.sorted_unique(np.concatenate([np.zeros(0, np.int64),
                                                   *(rows for rows, _ in examples)]))
    windows = contexts.example_windows(store, every, n_rows)
    pairs = [contexts.shading_pairs(windows, rows, lat, m.d_sae)
             for (rows, lat), m in zip(examples, members, strict=True)]
    acts = context_acts(store, members, n_rows, pairs, opts.batch_size, device)
    if not store.has_sequences:
        notes.append("this store keeps no token sequences (imported with `cache-acts import`, or "
                     "cached before stores kept them), so each example shows its own token only")
    ids: set[int] = set(windows.tokens[windows.tokens >= 0].tolist())
    site_members = []
    for i, (m, s) in enumerate(zip(members, stats, strict=True)):
        folder = tmp / "data" / f"m{i}"
        tables = _logits(m, loaded)
        if tables is not None:
            ids |= set(tables.promoted_ids.ravel().tolist()) | set(
                tables.suppressed_ids.ravel().tolist())
        _write_member(folder, f"m{i}", s, shown[i], windows, (pairs[i], acts[i]), tables)
        site_members.append({
            "dir": f"m{i}", "name": m.name, "arch": m.arch, "d_sae": m.d_sae,
            "shown": shown[i], "inputs": m.store_inputs, "output": m.out_hook,
            "dead": int((s.fire_count[:shown[i]] == 0).sum()),
            "logits": tables is not None})
    site.write_jsonp(tmp / "data" / "vocab.js", "vocab", _vocab(sorted(ids), loaded))
    site.write_jsonp(tmp / "data" / "site.js", "site", {
        "title": path.resolve().name, "store": str(store.path), "store_rows": store.n_rows,
        "rows": n_rows, "model": store.manifest.model, "has_context": store.has_sequences,
        "text": loaded is not None, "notes": notes, "members": site_members,
        "top": opts.top, "samples": SAMPLES, "before": contexts.BEFORE, "after": contexts.AFTER})
    site.publish(tmp, out)
    return Built(out / "index.html", [m.name for m in members], n_rows, notes)


def _check_request(store: Store, members: list[FeatureMember], opts: FeatureOptions) -> None:
    if opts.rows is not None and opts.rows > store.n_rows:
        fail(f"--rows {opts.rows:,} is more than the store's {store.n_rows:,} rows; ask for at "
             f"most {store.n_rows:,}")
    if opts.latents is not None:
        narrow = [m for m in members if m.d_sae < opts.latents]
        if narrow:
            fail(f"--latents {opts.latents:,} is more than {narrow[0].name} has "
                 f"({narrow[0].d_sae:,}); ask for at most {min(m.d_sae for m in members):,}")
    for m in members:
        missing = [h for h in m.store_inputs if h not in store.hooks]
        if missing:
            fail(f"{m.name} reads hook {missing[0]!r}, which store {store.path} does not hold "
                 f"(it holds {', '.join(store.hooks)}); pass --store with its store")


def _model(store: Store, opts: FeatureOptions, device: torch.device
           ) -> tuple[LoadedModel | None, list[str]]:
    """The model for token text and logit tables: --model, else the store's when its manifest
    says how to load it; None (with a note) when there is none."""
    from train_sae.evaluation.eval_sweep import model_spec_from_manifest

    info = store.manifest.model_info
    if opts.model is None and info.get("source", {}).get("kind") is None:
        return None, ["the store records no model to load, so tokens are shown by id and there "
                      "are no logit tables; pass --model for them"]
    spec = opts.model if opts.model is not None else model_spec_from_manifest(store.manifest)
    loaded = load_model(spec, device=str(device))
    recorded = store.manifest.fingerprints.get("model")
    if isinstance(recorded, dict) and "digest" in recorded and not same(
            recorded, loaded.info.get("fingerprint")):
        fail(f"--model {spec} is not the model the store was cached with (content "
             f"{short(loaded.info.get('fingerprint'))}, the store's {short(recorded)}); pass "
             "that model")
    return loaded, []


def _examples(s: LatentStats, shown: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, latents) of every example of latents 0..shown-1 (top and sampled)."""
    rows = np.concatenate([s.top_rows[:, :shown], s.sample_rows[:, :shown]])  # [k, shown]
    latents = np.broadcast_to(np.arange(shown), rows.shape)
    ok = rows >= 0
    return rows[ok].astype(np.int64), latents[ok].astype(np.int64)


def _logits(m: FeatureMember, loaded: LoadedModel | None) -> LogitTables | None:
    if loaded is None or not m.writes_residual:
        return None
    W_U = getattr(loaded.model, "W_U", None)  # [d_model, d_vocab]
    if W_U is None or m.model.W_dec.shape[1] != W_U.shape[0]:
        return None
    return logit_tables(m.model.W_dec.detach(), W_U, LOGIT_TOKENS)


def _vocab(ids: list[int], loaded: LoadedModel | None) -> dict[str, str]:
    tok = loaded.tokenizer if loaded is not None else None
    if tok is None:
        return {str(i): f"#{i}" for i in ids}
    return {str(i): tok.decode([i]) for i in ids}


def _write_member(folder: Path, name: str, s: LatentStats, shown: int, windows: contexts.Windows,
                  shading: tuple[np.ndarray, np.ndarray], tables: LogitTables | None) -> None:
    """list.js and one l/<i>.js per latent 0..shown-1 of one member."""
    density, mean = s.density[:shown], s.mean_when_firing[:shown]
    count = s.fire_count[:shown]
    top_rows = s.top_rows[:, :shown]
    top_tokens = np.full(top_rows.shape, -1)  # [k, shown] the example tokens of the top examples
    if len(windows.rows):
        w = windows.index(np.where(top_rows >= 0, top_rows, windows.rows[0]))
        top_tokens = np.where(top_rows >= 0, windows.tokens[w, windows.center[w]], -1)
    site.write_jsonp(folder / "list.js", "list", name, {
        "density": [float(fmt(v)) for v in density.tolist()],
        "mean": [float(fmt(v)) for v in mean.tolist()],
        "max": [float(fmt(v)) if c else 0.0 for v, c in zip(s.top_values[0, :shown].tolist(),
                                                             count.tolist(), strict=True)],
        "count": count.tolist(),
        "tokens": [[t for t in dict.fromkeys(col) if t >= 0][:LIST_TOKENS]
                   for col in top_tokens.T.tolist()]})
    for lo in range(0, shown, PAGE_BLOCK):  # pages of a block of latents at a time
        _write_pages(folder, name, s, range(lo, min(lo + PAGE_BLOCK, shown)), windows, shading,
                     tables)


def _write_pages(folder: Path, name: str, s: LatentStats, block: range,
                 windows: contexts.Windows, shading: tuple[np.ndarray, np.ndarray],
                 tables: LogitTables | None) -> None:
    d_sae = s.fire_count.shape[0]
    cols = slice(block.start, block.stop)
    keys, acts = shading
    density, mean, count = s.density, s.mean_when_firing, s.fire_count
    top = examples_json(s.top_values[:, cols], s.top_rows[:, cols], windows, keys, acts, d_sae,
                        first=block.start)
    q_values, q_rows, bounds = quantile_tables(s.sample_values[:, cols], s.sample_rows[:, cols],
                                               QUANTILE_GROUPS)
    sampled = examples_json(q_values, q_rows, windows, keys, acts, d_sae, first=block.start)
    for j, i in enumerate(block):
        head = {"i": i, "count": int(count[i]), "density": float(fmt(density[i])),
                "mean": float(fmt(mean[i])),
                "hist": {"width": float(s.hist_width[i]), "counts": s.hist_counts[i].tolist()}
                if count[i] else None}
        if tables is not None:
            head["logits"] = {
                "promoted": [[t, float(fmt(v))] for t, v in zip(
                    tables.promoted_ids[i].tolist(), tables.promoted[i].tolist(), strict=True)],
                "suppressed": [[t, float(fmt(v))] for t, v in zip(
                    tables.suppressed_ids[i].tolist(), tables.suppressed[i].tolist(),
                    strict=True)]}
        groups = ",".join(
            f'{{"low":{fmt(q_values[b - 1, j])},"high":{fmt(q_values[a, j])},'
            f'"examples":[{",".join(sampled[j][a:b])}]}}' for a, b in bounds[j])
        page = (json.dumps(head, separators=(",", ":"), allow_nan=False)[:-1]
                + f',"top":[{",".join(top[j])}],"quantiles":[{groups}]}}')
        site.write_raw(folder / "l" / f"{i}.js", "latent", f'"{name}",{i},{page}')
    assert HIST_BINS == s.hist_counts.shape[1]
