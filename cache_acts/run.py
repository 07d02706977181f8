"""`cache-acts run`: one or more models over a token stream, cached through the two-pass shuffle
engine. With several models (see cache_acts.model_list) the token rows are made once and every
model runs on each batch, so row i of every stored hook is the same token."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache_acts.engine import Job, run_job, work_dir
from cache_acts.model_list import ModelChoice, check_shared_tokenizer, model_label, parse_models
from cache_acts.rows import RowBatch
from shared.distributed import LOCAL, World
from shared.errors import check_seed, fail
from shared.models import LoadedModel, capture, check_context_size, hook_dims, load_model
from shared.storage import Location, as_location
from shared.store import Manifest, check_dtype, resolve_shard_rows, to_storage
from shared.tokens import (
    TokenSpec,
    count_sequences,
    iter_token_batches,
    kept_positions,
    source_fingerprint,
)
from shared.units import MiB


@dataclass
class RunConfig:
    """What `cache-acts run` caches and how (the CLI flags, one field each)."""

    out: Location  # a local folder or any fsspec URL (a Path is taken as a local folder)
    tokens: TokenSpec
    # None: the embedded default (shared.embedded); a spec; or a list of `[TAG=]SPEC` (repeated
    # --model) to cache several models over the same tokens (cache_acts.model_list)
    model: str | list[str] | None = None
    # `[TAG/]HOOK` each; [] -> DEFAULT_HOOK of the embedded default
    hooks: list[str] = dataclasses.field(default_factory=list)
    max_tokens: int | None = None  # cache exactly this many rows; None: the whole dataset
    batch_size: int = 32  # sequences per forward pass
    dtype: str = "float32"  # stored dtype of the activations
    model_dtype: str = "float32"  # dtype the model runs in
    compression: str | None = None
    seed: int = 0
    device: str = "cpu"
    chunk_rows: int = 4096
    shard_rows: int | None = None  # None: shared.store.default_shard_rows
    shuffle_memory: int = 512 * MiB
    tmp_dir: str | None = None  # local folder for the work files of a remote --out
    trust_remote_code: bool = False  # let an hf: model run the modelling code its hub repo ships

    def __post_init__(self) -> None:
        self.out = as_location(self.out)
        check_dtype(self.dtype)
        if self.batch_size < 1:
            fail(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.chunk_rows < 1:
            fail(f"--chunk-rows must be at least 1, got {self.chunk_rows}")
        check_seed(self.seed)
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"--tokens must be at least 1, got {self.max_tokens}")
        if self.shuffle_memory < 2:
            fail(f"--shuffle-memory must be positive, got {self.shuffle_memory} bytes")

    def model_specs(self) -> list[str]:
        """The --model values: [] for the embedded default."""
        if self.model is None:
            return []
        return [self.model] if isinstance(self.model, str) else list(self.model)

    def settings(self, choices: list[ModelChoice], fingerprints: dict[str, Any], shard_rows: int
                 ) -> dict:
        """What decides the store's bytes; a --resume must repeat these (the bucket count is
        kept from the first run, so --shuffle-memory may change). `choices`: the resolved
        models, whose tags, specs and stored hook names (in order) must all match;
        `fingerprints`: the models' and the token source's content (`input_fingerprints`);
        `shard_rows`: the resolved --shard-rows."""
        return {
            "model_fingerprint": fingerprints["model"],
            "dataset_fingerprint": fingerprints["dataset"],
            # the models and the token source are known by the fingerprints above, so a moved
            # or renamed file with the same bytes resumes; the tags and the packing must match
            "model": [c.tag for c in choices],
            "hooks": [c.stored(h) for c in choices for h in c.hooks],
            "packing": {k: v for k, v in self.tokens.to_dict().items()
                        if k not in ("dataset", "split")},
            "max_tokens": self.max_tokens, "batch_size": self.batch_size, "dtype": self.dtype,
            "model_dtype": self.model_dtype, "compression": self.compression, "seed": self.seed,
            "chunk_rows": self.chunk_rows, "shard_rows": shard_rows,
        }


def model_source(models: list[tuple[ModelChoice, LoadedModel]], spec: TokenSpec,
                 batch_size: int, dtype: str):
    """(cursor (sequences consumed), mine) -> RowBatches of the kept positions of each batch
    that is mine, with one forward pass per model per batch (each stopping after its deepest
    hook), None for the others. The token rows come from the first model's tokenizer;
    check_shared_tokenizer made sure the others agree."""
    first = models[0][1]

    def batches(cursor: int, mine: Callable[[int], bool]) -> Iterator[RowBatch | None]:
        for k, tb in enumerate(iter_token_batches(spec, first.tokenizer, batch_size,
                                                  start_sequence=cursor,
                                                  d_vocab=first.model.cfg.d_vocab)):
            if not mine(k):  # another rank's batch
                cursor += tb.tokens.shape[0]
                yield None
                continue
            keep = tb.keep  # [b, ctx] bool
            acts: dict[str, np.ndarray] = {}  # stored hook -> [kept rows, d_in]
            for choice, loaded in models:
                for hook, a in capture(loaded.model, tb.tokens, list(choice.hooks)).items():
                    acts[choice.stored(hook)] = to_storage(a[keep.to(a.device)], dtype)
            b, ctx = tb.tokens.shape
            cursor += b
            yield RowBatch(
                acts=acts,
                token_ids=tb.tokens[keep].to(torch.int32).numpy(),
                seq_index=tb.seq_index[:, None].expand(b, ctx)[keep].numpy(),
                position=torch.arange(ctx, dtype=torch.int32)[None].expand(b, ctx)[keep].numpy(),
                cursor=cursor,
                sequences=tb.tokens.to(torch.int32).numpy(),  # the store's `sequences` rows
                first_sequence=int(tb.seq_index[0]),
            )

    return batches


def run_cache(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
              loaded: LoadedModel | None = None, world: World = LOCAL) -> Manifest:
    """Cache cfg's activations to cfg.out (see cache_acts.engine for the two passes), on every
    rank of `world` (each running the models on its share of the batches on its own device).
    `loaded`: the one model cfg.model names, already loaded (benchmarks and tests reuse one)."""
    choices = parse_models(cfg.model_specs(), cfg.hooks)
    ctx = cfg.tokens.context_size
    models: list[LoadedModel] = []
    d_in: dict[str, int] = {}  # stored hook -> width
    for choice in choices:
        with choice.named_in_errors():
            if loaded is None:
                lm = load_model(choice.spec, device=cfg.device, dtype=cfg.model_dtype,
                                trust_remote_code=cfg.trust_remote_code)
            else:
                assert len(choices) == 1, "`loaded` is for single-model runs"
                lm = loaded
            dims = hook_dims(lm.model, list(choice.hooks))
            check_context_size(lm.model, ctx)
        d_in.update({choice.stored(h): d for h, d in dims.items()})
        models.append(lm)
    check_shared_tokenizer(choices, models, cfg.tokens)
    tokenizer = models[0].tokenizer
    if tokenizer is None and cfg.tokens.token_column is None:
        fail("this model has no tokenizer; pass pre-tokenized data with --token-column")
    per_sequence = kept_positions(cfg.tokens)  # at most; --drop-special may keep fewer
    if cfg.max_tokens is not None:
        need = -(-cfg.max_tokens // per_sequence)
        have = count_sequences(cfg.tokens, tokenizer, limit=need)
        if have < need:
            fail(_too_short(have * per_sequence, cfg.max_tokens, ctx))
        row_bound = cfg.max_tokens
    else:
        row_bound = count_sequences(cfg.tokens, tokenizer) * per_sequence
    single = len(choices) == 1 and choices[0].tag is None
    fingerprints = input_fingerprints(choices, models, cfg.tokens, single)
    shard_rows = resolve_shard_rows(cfg.shard_rows, cfg.chunk_rows, d_in, cfg.dtype, row_bound)
    settings = cfg.settings(choices, fingerprints, shard_rows)
    manifest = Manifest(
        model=model_label(choices, [lm.spec for lm in models]), hooks=settings["hooks"],
        d_in=d_in, dtype=cfg.dtype, n_rows=0, context_size=ctx, seed=cfg.seed,
        chunk_rows=cfg.chunk_rows, shard_rows=shard_rows, prepend_bos=cfg.tokens.prepend_bos,
        dataset=cfg.tokens.to_dict(), compression=cfg.compression, fingerprints=fingerprints,
        model_info=models[0].info if single else {
            "models": {c.tag: lm.spec for c, lm in zip(choices, models, strict=True)},
            "per_model": {c.tag: lm.info for c, lm in zip(choices, models, strict=True)},
        },
    )
    job = Job(
        out=cfg.out, work=work_dir(cfg.out, cfg.tmp_dir), manifest=manifest,
        settings=settings, row_bound=row_bound, max_rows=cfg.max_tokens, shuffle_memory=cfg.shuffle_memory,
        short_message=_too_short("{n}", "{want}", ctx),
        nonfinite_hint="the model produced them; check the model and its --model-dtype",
        sequences=True,
    )
    source = model_source(list(zip(choices, models, strict=True)), cfg.tokens, cfg.batch_size,
                          cfg.dtype)
    with torch.inference_mode():
        return run_job(job, source, resume=resume, overwrite=overwrite, world=world)


def input_fingerprints(choices: list[ModelChoice], models: list[LoadedModel], tokens: TokenSpec,
                       single: bool) -> dict[str, Any]:
    """What the store is cached from, by content: {"model": fp (or {tag: fp}), "dataset": fp}."""
    per_model = {c.tag: lm.info["fingerprint"] for c, lm in zip(choices, models, strict=True)}
    return {"model": next(iter(per_model.values())) if single else per_model,
            "dataset": source_fingerprint(tokens)}


def _too_short(have: object, want: object, ctx: int) -> str:
    return (f"the dataset provides only {have} tokens (at context size {ctx}) but --tokens "
            f"asks for {want}; lower --tokens or add data")
