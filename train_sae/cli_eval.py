"""`train-sae eval` and `train-sae report`: thin typer layers over train_sae.evaluation.eval_sweep and
train_sae.evaluation.report (registered on the `train-sae` app in train_sae/cli.py).

Both modules are imported inside the commands: eval_sweep pulls in transformer_lens (seconds)
and report pulls in matplotlib, which `train-sae run`, `sweep` and `--help` never need; the
trainer stays independent of the model (tests/test_train_cli.py checks this).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SweepPath = Annotated[Path, typer.Argument(
    help="a sweep folder (--out of `train-sae sweep`) or one run folder inside it")]
# where a sweep's store is now (eval, features)
MovedStore = Annotated[str | None, typer.Option(
    help="where the sweep's store is now, if it moved (checked by content against the "
         "store the sweep was trained on): a folder or an fsspec URL")]
StorageOption = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="KEY=VALUE for a remote store's fsspec filesystem (repeatable)")]


def eval_command(
    path: SweepPath,
    model: Annotated[str | None, typer.Option(
        help="model to splice into: hf:NAME_OR_PATH, official name, HF folder, .gguf file or "
             "random:CONFIG.json (default: the store's model)")] = None,
    store: MovedStore = None,
    storage_option: StorageOption = None,
    dataset: Annotated[str | None, typer.Option(
        help="hub dataset or local text/jsonl/parquet file or folder (default: the store's)")] = None,
    text_column: Annotated[str | None, typer.Option(help="text column to tokenize")] = None,
    token_column: Annotated[str | None, typer.Option(
        help="column of pre-tokenized rows (instead of --text-column)")] = None,
    split: Annotated[str | None, typer.Option(
        help="dataset split (another split than the cached one is held out as a whole)")] = None,
    context_size: Annotated[int | None, typer.Option(help="tokens per sequence")] = None,
    bos: Annotated[bool | None, typer.Option(
        help="prepend BOS to every sequence (default: as cached)")] = None,
    drop_special: Annotated[bool | None, typer.Option(
        help="leave BOS / padding positions clean and unscored (default: as cached)")] = None,
    first_position: Annotated[int | None, typer.Option(
        help="leave positions before N clean (default: as cached)")] = None,
    n_tokens: Annotated[int, typer.Option(
        help="held-out tokens to evaluate on (rounded up to whole sequences)")] = 32_768,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda or cuda:N (default: cuda when available)")] = None,
    ablation_mean: Annotated[str, typer.Option(
        help="mean-ablation vector: 'store' (the store's mean activation) or 'eval' "
             "(the mean over the evaluated tokens)")] = "store",
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="let an hf: model (or the store's, cached with "
        "--trust-remote-code) run the modelling code its repo ships")] = False,
) -> None:
    """Splice each dictionary into the model on held-out tokens: CE loss recovered, KL, L0, FVU.

    An SAE replaces its hook, a transcoder its output hook (predicted from its input hook in the
    same pass), a CLT every output hook at once, a crosscoder each hook alone and all together.
    Results go into each run's metrics.json under "eval" and are printed as a table.
    Crosscoders over several models (model diffing) are skipped with a note (see
    train_sae.evaluation.eval_sweep).
    """
    import torch

    from shared import distributed
    from shared.storage import parse_storage_options
    from train_sae.evaluation.eval_sweep import (
        EvalOptions,
        evaluate_path,
        evaluated_kinds,
        format_table,
    )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # under torchrun the members are spread over the ranks (each on its own GPU for `cuda`)
    with distributed.init("cuda" if device.startswith("cuda") else "cpu") as world:
        opts = EvalOptions(model=model, store=store, dataset=dataset, text_column=text_column,
                           token_column=token_column, split=split, context_size=context_size,
                           prepend_bos=bos, drop_special=drop_special,
                           first_position=first_position, n_tokens=n_tokens,
                           batch_size=batch_size, device=world.device(device),
                           mean_source=ablation_mean, trust_remote_code=trust_remote_code,
                           storage_options=parse_storage_options(storage_option or []))
        results = evaluate_path(path, opts, world)
        if world.is_main:
            first = next(iter(results.values()))
            typer.echo(f"evaluated {evaluated_kinds(results)} on {first['n_tokens']} next-token "
                       f"predictions: {first['tokens_source']}")
            typer.echo(format_table(results))


def report_command(path: SweepPath) -> None:
    """Write SWEEP/report.md, SWEEP/pareto.png and SWEEP/density.png; print the table."""
    from train_sae.evaluation.report import write_report

    files = write_report(path)
    typer.echo(files.table)
    typer.echo(f"report: {files.report}")
    typer.echo(f"pareto plot: {files.pareto}")
    if files.density is not None:
        typer.echo(f"feature density: {files.density}")
