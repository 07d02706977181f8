"""The `cache-acts` command line: a thin typer layer over run_cache, import_files, info, verify."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated

import typer

from shared.atomic import check_out
from shared.distributed import exit_together, init
from shared.errors import fail, run_cli

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Cache exactly, globally shuffled model activations to a Zarr v3 store.",
)

Out = Annotated[str, typer.Option("--out", "-o", help=(
    "Store to write: a local folder or an fsspec URL (s3://bucket/path, gs://..., file://...; "
    "pip install 'sae-cache[s3]' or '[gcs]')."))]
StorageOption = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="KEY=VALUE for the store's fsspec filesystem (repeatable; VALUE is "
    "JSON when it parses, a dotted KEY nests), e.g. endpoint_url=http://127.0.0.1:9000.")]
TmpDir = Annotated[str | None, typer.Option(help=(
    "Local folder for the shuffle's work files (bucket files, resume state; room for one "
    "uncompressed copy of the store). Default: inside a local --out; the system temp folder for "
    "a remote one. Several nodes writing one store need it on a file system they share."))]
Seed = Annotated[int, typer.Option(help="Seed of the shuffle (the same seed gives the same store).")]
Dtype = Annotated[str, typer.Option(help="Stored dtype: float32, float16 or bfloat16 (kept as uint16 bits).")]
Compression = Annotated[str, typer.Option(
    help="none (the trainer memory-maps chunks in their shards), zstd or zstd:LEVEL (1-22).")]
ChunkRows = Annotated[int, typer.Option(help="Rows per chunk of every array.")]
ShardRows = Annotated[str | None, typer.Option(
    help="Rows per shard object (Zarr v3 sharding), a multiple of --chunk-rows (e.g. 256k). "
         "Default: about 128 MiB of the widest hook per shard.")]
ShuffleMemory = Annotated[str, typer.Option(
    help="Memory for the shuffle: one bucket is at most about half of it (e.g. 512MiB, 4GiB).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing store at --out.")]
Resume = Annotated[bool, typer.Option(
    help="Continue an interrupted run at --out (same options); the result is identical.")]


def store_location(text: str, storage_option: list[str] | None, option: str):
    """The one place a store argument is interpreted: a local folder or an fsspec URL, checked
    (shared.storage.location; a local --out must be a writable folder)."""
    from shared.storage import location, parse_storage_options

    loc = location(text, parse_storage_options(storage_option or []), option=option)
    if option == "--out" and loc.local_path is not None:
        check_out(loc.local_path)
    return loc


def check_compression(text: str) -> str | None:
    if text == "none":
        return None
    m = re.fullmatch(r"zstd(?::(\d+))?", text)
    if not m or (m.group(1) and not 1 <= int(m.group(1)) <= 22):
        fail(f"unknown --compression {text!r}; choose none, zstd or zstd:LEVEL with LEVEL 1-22")
    return text


def import_hooks(given: list[str], files: list[Path]) -> dict[str, list[Path]]:
    """`cache-acts import`'s hooks: `--hook NAME FILE...`, or `--hook NAME=FILE[,FILE...]`
    repeated."""
    pairs = [h for h in given if "=" in h]
    if not given:
        fail("--hook is missing; pass --hook NAME with files, or --hook NAME=FILE[,FILE...]")
    if not pairs:
        if len(given) > 1:
            fail(f"--hook is given {len(given)} times without files; give each hook its files "
                 "as --hook NAME=FILE[,FILE...]")
        if not files:
            fail(f"no input files for --hook {given[0]}; list .npy or .safetensors files")
        return {given[0]: files}
    if len(pairs) < len(given) or files:
        fail("mix of --hook NAME with FILES and --hook NAME=FILE: use one form, "
             "--hook NAME=FILE[,FILE...] for each hook when there are several")
    hooks: dict[str, list[Path]] = {}
    for pair in pairs:
        name, _, paths = pair.partition("=")
        if name in hooks:
            fail(f"--hook {name} is given twice; list all its files in one --hook "
                 f"{name}=FILE1,FILE2")
        hooks[name] = [Path(p) for p in paths.split(",") if p]
    return hooks


def _count_or_none(text: str | None) -> int | None:
    from shared.units import parse_count

    return None if text is None else parse_count(text)


def _modes(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        fail("--resume and --overwrite contradict each other; pass one of them")


@app.command()
def run(
    out: Annotated[str | None, typer.Option("--out", "-o", help=(
        "Store to write: a local folder or an fsspec URL (s3://bucket/path, gs://..., "
        "file://...; pip install 'sae-cache[s3]' or '[gcs]')."))] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="hf:NAME_OR_PATH (any Hugging Face causal LM, hub name or checkpoint folder, "
             "through TransformerBridge; hub names transformer_lens does not list go there "
             "too), transformer_lens model name, HF checkpoint folder, .gguf file or "
             "random:CONFIG.json. Default: the embedded SmolLM2-135M-Instruct. Repeat as "
             "TAG=SPEC (--model base=... --model chat=...) to cache several models that share "
             "a tokenizer over the same tokens; their hooks are stored as TAG/HOOK.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Let an hf: model run the modelling code its hub repo "
        "ships (only for repos you trust; eval reloads the model with it).")] = False,
    list_hooks: Annotated[bool, typer.Option(
        "--list-hooks", help="Print the model's hook points (firing order, width per token, "
        "aliases) and exit; needs no --out.")] = False,
    dataset: Annotated[str | None, typer.Option(
        help="HF hub dataset, or a local text/jsonl/parquet file or folder. "
             "Default: the embedded Shakespeare plays.")] = None,
    text_column: Annotated[str, typer.Option(help="Column holding text.")] = "text",
    token_column: Annotated[str | None, typer.Option(
        help="Column holding pre-tokenized ids (instead of --text-column).")] = None,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    context_size: Annotated[int, typer.Option(help="Tokens per sequence.")] = 128,
    bos: Annotated[bool, typer.Option(help="Prepend BOS to every sequence.")] = True,
    drop_special: Annotated[bool, typer.Option(
        help="Do not cache BOS / padding positions.")] = False,
    first_position: Annotated[int, typer.Option(
        help="Cache only positions >= N of each sequence (0 is the BOS when prepended), like "
             "SAELens' seqpos_slice; earlier positions still serve as context.")] = 0,
    hook: Annotated[list[str] | None, typer.Option(
        help="Hook point to cache (repeat for several, all in one forward pass). With several "
             "models a HOOK is taken from every model, TAG/HOOK from that model only.")] = None,
    tokens: Annotated[str | None, typer.Option(
        help="Cache exactly this many tokens (e.g. 200k, 5M). Default: the whole dataset.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 32,
    dtype: Dtype = "float32",
    model_dtype: Annotated[str, typer.Option(help="Dtype the model runs in.")] = "float32",
    compression: Compression = "none",
    seed: Seed = 0,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda or cuda:N. Default: cuda when available.")] = None,
    chunk_rows: ChunkRows = 4096,
    shard_rows: ShardRows = None,
    shuffle_memory: ShuffleMemory = "512MiB",
    resume: Resume = False,
    overwrite: Overwrite = False,
    storage_option: StorageOption = None,
    tmp_dir: TmpDir = None,
) -> None:
    """Run a model (or several sharing a tokenizer) over a token stream and cache its
    activations, globally shuffled."""
    import torch

    from cache_acts.inspect_store import info
    from cache_acts.run import RunConfig, run_cache
    from shared.tokens import TokenSpec
    from shared.units import parse_count, parse_size

    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if list_hooks:
        typer.echo(model_hooks(list(model or []), kind, model_dtype, trust_remote_code))
        return
    if out is None:
        fail("--out is missing: name the store to write (or pass --list-hooks to only list "
             "the model's hook points)")
    _modes(resume, overwrite)
    world = init("cuda" if kind.startswith("cuda") else "cpu")
    spec = TokenSpec(
        dataset=dataset, text_column=text_column, token_column=token_column, split=split,
        context_size=context_size, prepend_bos=bos, drop_special=drop_special,
        first_position=first_position,
    )
    cfg = RunConfig(
        out=store_location(out, storage_option, "--out"), tokens=spec, model=list(model or []), hooks=list(hook or []),
        max_tokens=parse_count(tokens) if tokens is not None else None,
        batch_size=batch_size, dtype=dtype, model_dtype=model_dtype,
        compression=check_compression(compression), seed=seed,
        device=world.device(kind) if kind == "cuda" else kind,
        chunk_rows=chunk_rows, shard_rows=_count_or_none(shard_rows),
        shuffle_memory=parse_size(shuffle_memory), tmp_dir=tmp_dir,
        trust_remote_code=trust_remote_code,
    )
    t0 = time.perf_counter()
    with world:
        m = run_cache(cfg, resume=resume, overwrite=overwrite, world=world)
    if world.is_main:
        dt = time.perf_counter() - t0
        typer.echo(f"cached {m.n_rows:,} tokens x {len(m.hooks)} hook(s) in {dt:.1f}s"
                   + (f" on {world.world_size} processes" if world.distributed else ""))
        typer.echo(info(cfg.out))


def model_hooks(specs: list[str], device: str, dtype: str, trust_remote_code: bool) -> str:
    """`run --list-hooks`: each model's hook points, one a line: name, width per token (heads
    x d_head for per-head hooks), the aliases it also answers to; hooks that give no vector per
    token (attention patterns, token ids) are marked. Several models: one block per TAG."""
    from cache_acts.model_list import parse_models
    from shared.models import list_hooks, load_model

    blocks = []
    for choice in parse_models(specs, ["-"]):
        with choice.named_in_errors():
            lm = load_model(choice.spec, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code)
        rows = list_hooks(lm.model)
        width = max(len(h.name) for h in rows)
        lines = [f"# {lm.spec} ({lm.backend}): {len(rows)} hook points"
                 + (f", model {choice.tag}" if choice.tag else "")]
        for h in rows:
            shape = "x".join(map(str, h.shape)) if h.cacheable else "not per token"
            alias = f"  = {', '.join(h.aliases)}" if h.aliases else ""
            lines.append(f"{h.name.ljust(width)}  {shape:>13}{alias}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@app.command("import")
def import_command(
    out: Out,
    files: Annotated[list[Path] | None, typer.Argument(
        help=".npy or .safetensors files (rows, d_in) of the one --hook NAME.")] = None,
    hook: Annotated[list[str] | None, typer.Option(
        help="NAME of the hook the FILES come from; or, repeated, NAME=FILE[,FILE...] for "
             "several hooks whose files hold the same rows in the same order (e.g. an MLP's "
             "input and output, for transcoders).")] = None,
    key: Annotated[str | None, typer.Option(
        help="Tensor name in .safetensors files that hold several.")] = None,
    model: Annotated[str, typer.Option(
        help="The model the activations came from, recorded in the manifest.")] = "imported",
    dtype: Dtype = "float32",
    compression: Compression = "none",
    seed: Seed = 0,
    chunk_rows: ChunkRows = 4096,
    shard_rows: ShardRows = None,
    shuffle_memory: ShuffleMemory = "512MiB",
    resume: Resume = False,
    overwrite: Overwrite = False,
    storage_option: StorageOption = None,
    tmp_dir: TmpDir = None,
) -> None:
    """Build a shuffled store from activations you already have."""
    from cache_acts.importer import ImportConfig, import_files
    from cache_acts.inspect_store import info
    from cache_acts.model_list import check_hook_name
    from shared.units import parse_size

    _modes(resume, overwrite)
    hooks = import_hooks(hook or [], list(files or []))
    for name in hooks:
        check_hook_name(name)
    cfg = ImportConfig(
        hooks=hooks, out=store_location(out, storage_option, "--out"), key=key, dtype=dtype,
        compression=check_compression(compression), seed=seed, chunk_rows=chunk_rows,
        shard_rows=_count_or_none(shard_rows), shuffle_memory=parse_size(shuffle_memory),
        model=model, tmp_dir=tmp_dir,
    )
    with init("cpu") as world:
        m = import_files(cfg, resume=resume, overwrite=overwrite, world=world)
    if world.is_main:
        n_files = sum(len(f) for f in hooks.values())
        typer.echo(f"imported {m.n_rows:,} rows of {len(hooks)} hook(s) from {n_files} file(s)")
        typer.echo(info(cfg.out))


StoreArg = Annotated[str, typer.Argument(help="Store: a local folder or an fsspec URL.")]


@app.command("info")
def info_command(
    store: StoreArg,
    json_: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    storage_option: StorageOption = None,
) -> None:
    """Summarise a store (or print its manifest with --json)."""
    from cache_acts.inspect_store import info

    typer.echo(info(store_location(store, storage_option, "STORE"), as_json=json_))


@app.command("verify")
def verify_command(store: StoreArg, storage_option: StorageOption = None) -> None:
    """Exit 0 only if the store is complete and every chunk matches its checksum."""
    from cache_acts.inspect_store import verify

    typer.echo(verify(store_location(store, storage_option, "STORE")))


def main() -> None:
    with exit_together():  # under torchrun, ranks that fail together exit together
        run_cli(app)
