"""`train-sae eval`: evaluate every finished member of a sweep (or one run) on held-out tokens.

Defaults come from the store the sweep was trained on (sweep.json -> store manifest): the same
model and the same token stream. Held-out tokens are the packed sequences that come right after
the last sequence cached in the store, in that same deterministic stream (`start_sequence`); when
the packing differs (another context size or BOS setting on the same source) the start is moved
past every cached token; another split or dataset starts at its first sequence. The result of each
member goes into its metrics.json under "eval".

Every kind of dictionary is spliced (train_sae/evaluation/evaluate.py has the details): an SAE
replaces its hook by its reconstruction; a transcoder replaces its output hook (an MLP's output)
by its prediction from its input hook (that MLP's input), read in the same pass; a CLT replaces
every output hook in one closed-loop pass (the replacement model: layer t's prediction from the
inputs of layers 0..t read in that pass); a crosscoder replaces each of its hooks alone and all of
them together by its reconstruction from their clean activations. Loss recovered is against
ablating the hooks each splice replaces. A crosscoder whose hooks come from several models (a
model-diffing store's `base/...`, `chat/...`) cannot be spliced into one model: it is skipped with
a one-line note on stderr (its per-hook FVU, L0 and relative decoder norms from training are in
metrics.json and `train-sae report`).

Under torchrun (`torchrun --nproc-per-node N --no-python train-sae eval SWEEP`) the members are
spread over the ranks like a sweep's, balanced by the cost of their spliced passes (`spread`);
every rank runs the shared clean and ablation passes for the hooks its members replace, writes
its members' metrics.json, and rank 0 prints the table of all of them. A member's result does
not depend on the others evaluated with it, so the files are those of one process.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from shared.distributed import LOCAL, World, balance
from shared.errors import fail
from shared.fingerprint import same, short
from shared.models import (
    HF_PREFIX,
    LoadedModel,
    check_context_size,
    check_hooks,
    hook_dims,
    load_model,
)
from shared.storage import location
from shared.store import Manifest, Store, open_store, store_fingerprint
from shared.tokens import TokenSpec, iter_token_batches, source_fingerprint
from train_sae.evaluation.evaluate import (
    SpliceTarget,
    check_splice_order,
    hook_means,
    splice_cost,
    splice_eval,
)
from train_sae.evaluation.report import member_folders
from train_sae.training.loading import load_dictionary
from train_sae.training.outputs import (
    METRICS_JSON,
    SWEEP_JSON,
    model_and_hook,
    read_json,
    read_sweep,
    write_json,
)
from train_sae.training.saving import OUR_SECTION

MEAN_SOURCES = ("store", "eval")


@dataclass
class EvalOptions:
    """What to evaluate on; every None falls back to the store's manifest."""

    model: str | None = None
    store: str | None = None  # where the sweep's store is now, when it moved
    dataset: str | None = None
    text_column: str | None = None
    token_column: str | None = None
    split: str | None = None
    context_size: int | None = None
    prepend_bos: bool | None = None
    drop_special: bool | None = None
    first_position: int | None = None
    n_tokens: int = 32_768  # held-out tokens (rounded up to whole sequences)
    batch_size: int = 8  # sequences per forward pass
    device: str = "cpu"
    mean_source: str = "store"  # mean-ablation vector: the store's stats mean or the eval tokens'
    trust_remote_code: bool = False  # let an hf: model run the code its hub repo ships
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)  # to reach a remote store

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            fail(f"--n-tokens must be >= 1, got {self.n_tokens}")
        if self.batch_size < 1:
            fail(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.mean_source not in MEAN_SOURCES:
            fail(f"--ablation-mean must be one of {', '.join(MEAN_SOURCES)}, got {self.mean_source!r}")
        if self.context_size is not None and self.context_size < 2:
            fail(f"--context-size must be >= 2 to score next tokens, got {self.context_size}")


@dataclass
class EvalMember:
    name: str
    folder: Path
    target: SpliceTarget
    model_name: str
    store_hooks: bool = False  # its target's hooks are still the store's names (to_model_hooks)
    store_names: dict[str, str] = field(default_factory=dict)  # model hook -> store hook


# --- finding what to evaluate -----------------------------------------------------------------
def sweep_document(path: Path) -> dict[str, Any]:
    """sweep.json of a sweep folder, or of the sweep a single run folder belongs to."""
    for folder in (path, path.parent):
        if (folder / SWEEP_JSON).exists():
            doc = read_sweep(folder)
            if doc.get("status", "complete") != "complete":
                fail(f"the sweep in {folder} is not finished; complete it with "
                     "`train-sae sweep ... --resume` before evaluating")
            return doc
    return {}


def model_hook(manifest: Manifest | None, hook: str) -> str:
    """The model's name of a store hook: a multi-model store's `tag/hook` -> `hook` (without the
    store at hand, any `tag/` prefix is dropped: model hook names have no '/')."""
    if manifest is not None:
        return model_and_hook(manifest, hook)[1]
    return hook.partition("/")[2] if "/" in hook else hook


def member_target(folder: Path) -> tuple[EvalMember | None, str]:
    """A finished member's splice target, or None and which models its hooks come from when they
    come from several (a model-diffing crosscoder cannot be spliced into one model). SAEs and
    transcoders name the model's hooks; crosscoders and CLTs the store's (`to_model_hooks`)."""
    model, cfg = load_dictionary(folder)
    kind = model.io_kind
    if kind in ("sae", "transcoder"):  # SAELens-style cfg.json
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        if not (meta.get("hook_name") or cfg.get("hook_name")):
            fail(f"{folder}/cfg.json names no hook (metadata.hook_name); save the SAE again")
        if kind == "transcoder" and not (meta.get("hook_name_out") or cfg.get("hook_name_out")):
            fail(f"{folder}/cfg.json names no output hook (metadata.hook_name_out); save the "
                 "transcoder again")
        target = SpliceTarget(folder.name, None, model, model.in_hooks, model.out_hooks)
        name = str(meta.get("model_name") or cfg.get("model_name") or "")
        ours = cfg.get(OUR_SECTION) if isinstance(cfg.get(OUR_SECTION), dict) else {}
        store_names = {h: str(ours[key]) for h, key in ((target.in_hooks[0], "store_hook"),
                                                        (target.out_hooks[0], "store_out_hook"))
                       if ours.get(key)}
        return EvalMember(folder.name, folder, target, name, store_names=store_names), ""
    models = [str(m) for m in (cfg.get("models") or [])]
    hooks = model.in_hooks + model.out_hooks
    tags = {h.partition("/")[0] if "/" in h else "" for h in hooks}  # a multi-model store's
    if len(set(models)) > 1 or len(tags) > 1:
        named = ", ".join(f"{h} of {m}" for h, m in zip(model.in_hooks, models, strict=False))
        return None, f"{folder.name} ({kind}: {named or ', '.join(hooks)})"
    target = SpliceTarget(folder.name, None, model, model.in_hooks, model.out_hooks)
    return EvalMember(folder.name, folder, target, models[0] if models else "",
                      store_hooks=True), ""


def load_members(path: Path) -> tuple[list[EvalMember], list[str], list[str]]:
    """Finished members as splice targets, plus the names of the members skipped: failed ones,
    and (with why) those whose hooks come from several models (see the module docstring)."""
    members, skipped, unspliceable = [], [], []
    for folder in member_folders(path):
        status = read_json(folder / METRICS_JSON, "member metrics").get("status")
        if status != "done":
            skipped.append(folder.name)
            continue
        member, why = member_target(folder)
        if member is None:
            unspliceable.append(why)
        else:
            members.append(member)
    if not members and unspliceable:
        fail(f"nothing to evaluate under {path}: the hooks of its finished members come from "
             f"several models, which cannot be spliced into one model: {'; '.join(unspliceable)}; "
             f"their per-hook FVU and L0 from training are in `train-sae report {path}`")
    if not members:
        fail(f"no finished member to evaluate under {path} (failed: "
             f"{', '.join(skipped) or 'none'})")
    return members, skipped, unspliceable


def to_model_hooks(members: list[EvalMember], manifest: Manifest | None) -> None:
    """Rename the hooks of members saved with the store's hook names (crosscoders, CLTs) to the
    model's."""
    for m in members:
        if m.store_hooks:
            t = m.target
            for h in t.in_hooks + t.out_hooks:
                m.store_names[model_hook(manifest, h)] = h
            t.in_hooks = [model_hook(manifest, h) for h in t.in_hooks]
            t.out_hooks = [model_hook(manifest, h) for h in t.out_hooks]
            t.hook = t.in_hooks[0]
            m.store_hooks = False


def model_spec_from_manifest(manifest: Manifest) -> str | None:
    """The --model that reloads the store's model: the embedded default (None), a path, or a name."""
    source = manifest.model_info.get("source", {})
    kind = source.get("kind")
    if kind == "embedded":
        return None
    if kind == "random":
        return f"random:{source['path']}"
    if kind in ("hf", "gguf"):
        return str(source["path"])
    if kind == "hub":
        return str(source["name"])
    if kind == "bridge":  # any Hugging Face causal LM, through TransformerBridge (shared.bridge)
        return HF_PREFIX + str(source.get("path") or source["name"])
    fail(f"cannot tell how to load the store's model {manifest.model!r}; pass --model")


def resolve_model(opts: EvalOptions, manifest: Manifest | None) -> LoadedModel:
    """--model, else the store's own model through the backend that cached it. A store cached
    with --trust-remote-code is reloaded only with --trust-remote-code given again: a store
    someone shares does not get to run its model's code without the user saying so."""
    if opts.model is not None:
        return load_model(opts.model, device=opts.device,
                          trust_remote_code=opts.trust_remote_code)
    if manifest is None:
        fail("the sweep's store is not available, so its model is unknown; pass --model")
    if manifest.model_info.get("source", {}).get("trust_remote_code") and \
            not opts.trust_remote_code:
        fail(f"the store's model {manifest.model} was cached with --trust-remote-code (it runs "
             "the Python code its repo ships); pass --trust-remote-code to eval if you trust it")
    return load_model(model_spec_from_manifest(manifest), device=opts.device,
                      trust_remote_code=opts.trust_remote_code)


def resolve_tokens(opts: EvalOptions, manifest: Manifest | None) -> TokenSpec:
    """The store's token stream, with any option the user gave replacing its value."""
    base: dict[str, Any] = dict(manifest.dataset) if manifest is not None else {}
    if opts.dataset is None and "dataset" not in base:
        fail("the sweep's store is not available, so its token source is unknown; pass --dataset"
             if manifest is None else
             "the store was imported from activation files and records no token source; "
             "pass --dataset (and --model) to evaluate on")
    given = {"dataset": opts.dataset, "text_column": opts.text_column,
             "token_column": opts.token_column, "split": opts.split,
             "context_size": opts.context_size, "prepend_bos": opts.prepend_bos,
             "drop_special": opts.drop_special, "first_position": opts.first_position}
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    known = set(TokenSpec.__dataclass_fields__)
    return TokenSpec(**{k: v for k, v in merged.items() if k in known})


def _content_per_sequence(context_size: int, prepend_bos: bool) -> int:
    return context_size - (1 if prepend_bos else 0)


@dataclass
class TrainingData:
    """What the sweep was trained on, as far as eval can know it: the store (when it is
    reachable) and its token source's content fingerprint (from the store or sweep.json)."""

    store: Store | None
    fingerprint: dict[str, Any] | None  # the token source's (shared.tokens.source_fingerprint)
    imported: bool  # cached from activation files: no token source to compare with


def training_data(doc: dict[str, Any], store: Store | None) -> TrainingData:
    manifest = store.manifest if store is not None else None
    if manifest is not None:
        fp = manifest.fingerprints.get("dataset")
        return TrainingData(store, fp, imported=bool(manifest.source_files))
    fp = doc.get("dataset_fingerprint")
    return TrainingData(None, fp, imported=bool(fp and fp.get("kind") == "activation files"))


def held_out_start(spec: TokenSpec, fp: dict[str, Any], trained: TrainingData
                   ) -> tuple[int, str]:
    """First sequence of `spec`'s stream (whose fingerprint is `fp`) not cached in the training
    store, and a sentence saying why. The streams are compared by content; where that cannot
    tell, this refuses."""
    where = spec.dataset or "the embedded Shakespeare text"
    if trained.imported:
        return 0, (f"sequences from the start of {where}; the store was imported from activation "
                   "files, so whether its rows came from these tokens cannot be told")
    if trained.fingerprint is None:  # a store written before fingerprints: refuses unless same
        _check_same_named_source(trained.store, spec)
    elif not _same_stream(trained.fingerprint, fp, where):
        return 0, (f"sequences from the start of {where}, other data than the store was "
                   f"cached from (content {short(fp)}, the store's {short(trained.fingerprint)})")
    if trained.store is None:
        fail(f"{where} is the data the sweep's store was cached from, and that store is not "
             "where sweep.json says (moved or deleted), so which sequences it holds is unknown; "
             "pass --store with its new path, or evaluate on other data (--dataset)")
    store = trained.store
    cached = store.manifest.dataset
    n_cached = last_cached_sequence(store) + 1
    same_packing = (cached.get("context_size") == spec.context_size
                    and cached.get("prepend_bos") == spec.prepend_bos)
    if same_packing:
        start = n_cached
    else:  # rows are consecutive slices of one token stream: skip past every cached token
        tokens = n_cached * _content_per_sequence(int(cached["context_size"]),
                                                  bool(cached["prepend_bos"]))
        start = -(-tokens // _content_per_sequence(spec.context_size, spec.prepend_bos))
    return start, (f"held-out sequences from #{start} of {where}, right after the {n_cached} "
                   "sequences cached in the store")


def _same_stream(cached: dict[str, Any], fp: dict[str, Any], where: str) -> bool:
    """Whether two token sources are one stream, by content; refuses where it cannot be told."""
    if same(cached, fp):
        return True
    if cached.get("files_digest") and cached.get("files_digest") == fp.get("files_digest"):
        fail(f"{where} holds the same files the store was cached from, read through another "
             "column; whether its tokens overlap the cached ones cannot be told; evaluate on the "
             "store's column (the default) or on other data")
    if cached.get("path") and cached.get("path") == fp.get("path"):
        fail(f"{where} changed since the store was cached from it (content "
             f"{short(cached)}, now {short(fp)}), so which of its sequences were cached cannot be "
             "told; evaluate on other data, or recache the store")
    if cached.get("kind") == fp.get("kind") == "hub" and all(
            cached.get(k) == fp.get(k) for k in ("name", "split", "text_column", "token_column")):
        if cached.get("revision") and fp.get("revision"):  # both known, and they differ
            fail(f"hub dataset {fp['name']} changed (revision {cached['revision'][:12]} when "
                 f"cached, {fp['revision'][:12]} now), so which of its sequences were cached "
                 "cannot be told; evaluate on another split or dataset")
        return True  # one revision unknown: the name and split are all there is to compare
    return False


def _check_same_named_source(store: Store | None, spec: TokenSpec) -> None:
    """For a store without fingerprints: go on only when `spec` names the same local path
    (resolved) or hub dataset and split, with the same columns; otherwise refuse."""
    if store is None:
        fail("the sweep records neither its store (not found) nor its data's fingerprint; "
             "pass --store with the store's path")
    cached = store.manifest.dataset

    def identity(d: dict[str, Any]) -> tuple:
        name = d.get("dataset")
        local = name is None or Path(name).expanduser().exists()
        where = str(Path(name).expanduser().resolve()) if name else None
        return (where, None if local else d.get("split"), d.get("text_column"),
                d.get("token_column"))

    if identity(cached) != identity(spec.to_dict()):
        fail(f"store {store.path} was written before stores recorded their data's content, so "
             f"whether {spec.dataset or 'the embedded text'} holds its training tokens cannot be "
             "told; evaluate on the store's own dataset (the default), or recache the store")


def last_cached_sequence(store: Store) -> int:
    """max(seq_index) over the store, read one chunk at a time."""
    arr = store.array("seq_index")
    step = store.manifest.chunk_rows
    return max(int(arr[i:i + step].max()) for i in range(0, store.n_rows, step))


# --- running it ---------------------------------------------------------------------------------
def token_batches(spec: TokenSpec, tokenizer: Any, d_vocab: int, opts: EvalOptions, start: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n_seq = -(-opts.n_tokens // spec.context_size)
    batches = [(b.tokens, b.keep) for b in iter_token_batches(
        spec, tokenizer, opts.batch_size, start_sequence=start, max_sequences=n_seq,
        d_vocab=d_vocab)]
    if not batches:
        fail(f"the token source has no sequences of {spec.context_size} tokens from #{start} on "
             "(the store cached all of it); pass --split or --dataset to evaluate on other text")
    return batches


def ablation_means(model: Any, hooks: list[str], store: Store | None, opts: EvalOptions,
                   batches: list[tuple[torch.Tensor, torch.Tensor]],
                   store_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The mean-ablation vector of each model hook: over the eval tokens, or the store's mean
    of the store hook it was cached as (`store_names`: model hook -> store hook, where they
    differ)."""
    if opts.mean_source == "eval":
        return hook_means(model, hooks, batches)
    names = {h: (store_names or {}).get(h, h) for h in hooks}
    if store is None or any(n not in store.manifest.stats for n in names.values()):
        fail("the store's mean activations are not available; pass --ablation-mean eval")
    return {h: torch.tensor(store.manifest.stats[n].mean, dtype=torch.float32)
            for h, n in names.items()}


def check_members(members: list[EvalMember], loaded: LoadedModel, doc: dict[str, Any]) -> str:
    """Refuse a model other than the one the members were trained on; returns how it was told.
    By content where the sweep records the model's fingerprint (a moved checkpoint is the same
    model), by name for older sweeps and multi-model stores; a store imported from activation
    files names no model to check, so any --model of the right width is taken."""
    recorded = doc.get("model_fingerprint", "absent")
    if recorded is None:
        how = "not checked: the store was imported from activation files"
    elif isinstance(recorded, dict) and "digest" in recorded:
        if not same(recorded, loaded.info.get("fingerprint")):
            fail(f"the model to evaluate with (content {short(loaded.info.get('fingerprint'))}) "
                 f"is not the one the sweep was trained on (content {short(recorded)}); pass "
                 "the matching --model")
        how = "the model the store was cached from (same content)"
    else:
        for m in members:
            if m.model_name and m.model_name != loaded.spec:
                fail(f"{m.name} was trained on activations of model {m.model_name!r}, but the "
                     f"model to evaluate with is {loaded.spec!r}; pass the matching --model")
        how = "the model the store was cached from (same name)"
    hooks = sorted({h for m in members for h in m.target.in_hooks + m.target.out_hooks})
    check_hooks(loaded.model, hooks)
    dims = hook_dims(loaded.model, hooks)
    for m in members:
        t, io = m.target, m.target.sae.io  # type: ignore[union-attr]
        for role, names, widths in (("input", t.in_hooks, io.in_splits),
                                    ("output", t.out_hooks, io.out_splits)):
            for h, d in zip(names, widths, strict=True):
                if dims[h] != d:
                    fail(f"{m.name} takes {role} width {d} at {h}, but {h} of this model has "
                         f"{dims[h]}; pass the matching --model")
    check_splice_order(loaded.model, [m.target for m in members])
    return how


def find_store(doc: dict[str, Any], given: str | None, options: dict[str, Any]
               ) -> Store | None:
    """The store the sweep was trained on: --store, else the path or URL in sweep.json if it
    is still there; checked by content against the sweep's record (a store replaced at the
    same path refuses)."""
    path = given or doc.get("store")
    if not path:
        return None
    where = location(path, options, option="--store")
    if given is None and not where.exists("zarr.json"):
        return None
    store = open_store(where)
    recorded = doc.get("store_fingerprint")
    if recorded is not None and not same(recorded, store_fingerprint(store.manifest)):
        fail(f"the store at {path} is not the one the sweep was trained on (content "
             f"{short(store_fingerprint(store.manifest))}, the sweep's {short(recorded)}); pass "
             "--store with the original store")
    return store


def spread(members: list[EvalMember], n_layers: int, world: World) -> list[EvalMember]:
    """This rank's share of the members: all of them in one process; under torchrun, balanced by
    the cost of each one's spliced passes, the blocks from each pass's first hook to the
    unembedding (a crosscoder of H hooks runs H + 1 passes; greedy longest-processing-time, as a
    sweep's members)."""
    if not world.distributed:
        return members
    if len(members) < world.world_size:
        fail(f"{world.world_size} ranks would share {len(members)} member(s) to evaluate, leaving "
             f"some with nothing to do; start at most {len(members)} (torchrun --nproc-per-node)")
    costs = [splice_cost(m.target, n_layers) for m in members]
    owner = balance(costs, world.world_size)
    return [m for m, r in zip(members, owner, strict=True) if r == world.rank]


def evaluate_path(path: str | Path, opts: EvalOptions, world: World = LOCAL
                  ) -> dict[str, dict[str, Any]]:
    """Evaluate every finished member under `path` (this rank's share of them under torchrun);
    write each one's metrics.json "eval". Returns every member's result, on every rank."""
    path = Path(path)
    members, _, unspliceable = load_members(path)
    if unspliceable and world.is_main:
        print(f"note: skipping {len(unspliceable)} member(s) whose hooks come from several "
              f"models, which cannot be spliced into one model: {'; '.join(unspliceable)}; their "
              "per-hook FVU and L0 from training are in metrics.json and `train-sae report`",
              file=sys.stderr)
    doc = sweep_document(path)
    store = find_store(doc, opts.store, opts.storage_options)
    manifest = store.manifest if store is not None else None
    to_model_hooks(members, manifest)
    spec = resolve_tokens(opts, manifest)
    loaded = resolve_model(opts, manifest)
    model_check = check_members(members, loaded, doc)
    check_context_size(loaded.model, spec.context_size)
    fingerprint = source_fingerprint(spec)
    start, source = held_out_start(spec, fingerprint, training_data(doc, store))
    batches = token_batches(spec, loaded.tokenizer, loaded.model.cfg.d_vocab, opts, start)
    everyone, members = members, spread(members, loaded.model.cfg.n_layers, world)
    hooks = sorted({h for m in members for h in m.target.out_hooks})
    store_names = {h: n for m in members for h, n in m.store_names.items()}
    means = ablation_means(loaded.model, hooks, store, opts, batches, store_names)
    for m in members:
        m.target.sae.to(next(loaded.model.parameters()).device).float().eval()
    n_scored = sum(int(keep[:, 1:].sum()) for _, keep in batches)
    with tqdm(total=n_scored, desc="eval", unit="tok",
              disable=not (opts.progress and world.is_main)) as bar:
        results = splice_eval(loaded.model, [m.target for m in members], batches, means,
                              progress=bar.update)
    n_seq = sum(t.shape[0] for t, _ in batches)
    context = {
        "model": loaded.spec, "model_check": model_check, "dataset": spec.to_dict(),
        "dataset_fingerprint": fingerprint, "start_sequence": start,
        "n_sequences": n_seq, "tokens_source": f"{source} ({n_seq} sequences)",
        "mean_source": ("mean over the evaluated tokens" if opts.mean_source == "eval"
                        else "the store's mean activation"),
    }
    for m in members:
        results[m.name] = {**results[m.name], **context}
        write_eval(m.folder, results[m.name])
    shares = world.all_gather_object(results)
    return {m.name: next(r[m.name] for r in shares if m.name in r) for m in everyone}


def write_eval(folder: Path, result: dict[str, Any]) -> None:
    """Add `result` under "eval" in folder/metrics.json (atomically; NaN as null)."""
    path = folder / METRICS_JSON
    doc = read_json(path, "member metrics")
    doc["eval"] = _json_safe(result)
    write_json(path, doc)


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return None if isinstance(v, float) and math.isnan(v) else v


EVAL_COLUMNS = (("l0", "L0"), ("fvu", "FVU"), ("ce_sae", "CE spliced"), ("ce_clean", "CE clean"),
                ("ce_zero_ablation", "CE zero"), ("ce_mean_ablation", "CE mean"),
                ("loss_recovered_zero", "rec. zero"), ("loss_recovered_mean", "rec. mean"),
                ("kl", "KL"))


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Plain-text table of the eval results, one row per member (its splice of every hook it
    predicts), then, under a crosscoder of several hooks, one row per hook spliced alone."""
    lines: list[tuple[str, dict[str, Any]]] = []
    for n, r in results.items():
        lines.append((n, r))
        lines += [(f"  {n} @ {h}", {"l0": r.get("l0"), **one})
                  for h, one in (r.get("per_hook") or {}).items()]
    width = max(len("member"), *(len(n) for n, _ in lines))
    head = "member".ljust(width) + "".join(f"{label:>12}" for _, label in EVAL_COLUMNS)
    rows = [head]
    for n, r in lines:
        rows.append(n.ljust(width) + "".join(
            f"{r[k]:>12.4g}" if isinstance(r.get(k), float) else f"{'-':>12}"
            for k, _ in EVAL_COLUMNS))
    return "\n".join(rows)


def evaluated_kinds(results: dict[str, dict[str, Any]]) -> str:
    """"3 SAE(s)", or "2 SAE(s), 1 transcoder(s) and 1 crosscoder(s)": what was evaluated."""
    counts: dict[str, int] = {}
    for r in results.values():
        kind = KIND_NAMES.get(str(r.get("kind", "sae")), str(r.get("kind")))
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{n} {kind}(s)" for kind, n in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


KIND_NAMES = {"sae": "SAE", "transcoder": "transcoder", "clt": "CLT", "crosscoder": "crosscoder"}
