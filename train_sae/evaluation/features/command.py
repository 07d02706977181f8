"""`train-sae features`: the typer layer over train_sae.evaluation.features.build (registered on
the `train-sae` app in train_sae/cli.py; the build is imported inside the command, so `--help`
stays fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from train_sae.cli_eval import MovedStore, StorageOption, SweepPath


def features_command(
    path: SweepPath,
    store: MovedStore = None,
    storage_option: StorageOption = None,
    rows: Annotated[str | None, typer.Option(
        help="store rows to read, e.g. 1M (default: all); the rows are shuffled, so the first "
             "N are a uniform sample")] = None,
    out: Annotated[Path | None, typer.Option(
        help="folder for the site (default: PATH/features); open its index.html")] = None,
    member: Annotated[list[str] | None, typer.Option(
        help="member to show (repeatable; default: every finished member)")] = None,
    latents: Annotated[int | None, typer.Option(
        help="pages for latents 0..N-1 of each member only (default: all)")] = None,
    top: Annotated[int, typer.Option(help="top activating examples per latent")] = 20,
    model: Annotated[str | None, typer.Option(
        help="model for token text and logit tables: official name, HF folder, .gguf file or "
             "random:CONFIG.json (default: the store's model)")] = None,
    batch_size: Annotated[int, typer.Option(help="rows encoded at once")] = 1024,
    device: Annotated[str, typer.Option(
        help="cpu, cuda, cuda:N or auto (cuda when there is one)")] = "auto",
) -> None:
    """Build a static feature browser: per latent the top activating contexts, samples from its
    activation quantiles, density, histogram and promoted/suppressed tokens, from one pass over
    the store for every member. Open OUT/index.html (no server needed)."""
    from shared.storage import parse_storage_options
    from shared.units import parse_count
    from train_sae.evaluation.features.build import FeatureOptions, build_features

    opts = FeatureOptions(out=out, store=store,
                          storage_options=parse_storage_options(storage_option or []),
                          rows=parse_count(rows) if rows is not None else None,
                          members=list(member or []), latents=latents, top=top, model=model,
                          batch_size=batch_size, device=device)
    built = build_features(path, opts)
    typer.echo(f"feature browser of {', '.join(built.members)} ({built.rows:,} rows): "
               f"{built.index}")
