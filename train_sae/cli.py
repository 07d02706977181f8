"""`train-sae`: train one SAE (`run`) or a sweep of many in one pass (`sweep`) over an activation store.

Both commands take the same options; in `sweep` the hyperparameter options take comma-separated
lists that expand to a grid (see train_sae/training/sweep.py), `run` must describe exactly one SAE.
`--hook` may be repeated (or `--hook all`): SAE members are trained for every chosen hook and
crosscoder members read all of them; `--out-hook` (repeated, one per `--hook`) names the hooks
transcoders and CLTs predict; all in one pass over the store.

The hyperparameter options (`--k`, `--l1`, `--lr`, ...) are not written here: one option per
entry of train_sae/params.py with a `flag` is added to the commands' signature (`with_params`),
and every entry also works as `--param NAME=V1,V2`.

Under `torchrun --nproc-per-node N --no-python train-sae sweep ...` the members are spread over
the N ranks (or, with --data-parallel, each member is trained on every rank on a share of each
batch); the outputs are those of one process (train_sae/training/trainer.py). Only rank 0 prints the
progress bar and the summary; every rank exits with the same code.
"""

from __future__ import annotations

import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from shared import distributed
from shared.atomic import check_out
from shared.errors import fail, run_cli
from shared.storage import location, parse_storage_options
from shared.units import parse_count
from train_sae.cli_eval import eval_command, report_command
from train_sae.dictionaries import REGISTRY
from train_sae.evaluation.features.command import features_command
from train_sae.params import PARAMS
from train_sae.training.config import DEFAULT_RESAMPLE_AT, TrainConfig
from train_sae.training.sweep import (
    GridSpec,
    applies,
    expand_grid,
    load_toml,
    parse_list,
    parse_values,
)
from train_sae.training.trainer import MemberResult, prepare, resolve_device, train

# `train-sae run/sweep` exit codes: 0 when at least one member finished, 2 for bad input (one
# `error:` line), 1 when training ran but every member failed (README, "Exit codes").
EXIT_ALL_FAILED = 1

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train sparse autoencoders on a cached activation store.")

Store = Annotated[str, typer.Option(
    help="activation store written by cache-acts: a local folder or an fsspec URL (s3://...)")]
StorageOption = Annotated[list[str] | None, typer.Option(
    "--storage-option", help="KEY=VALUE for a remote store's fsspec filesystem (repeatable; "
    "VALUE is JSON when it parses), e.g. endpoint_url=http://127.0.0.1:9000")]
Out = Annotated[Path, typer.Option(help="sweep folder: one sub-folder per SAE, plus sweep.json")]
Hook = Annotated[list[str] | None, typer.Option(
    help="hook to train on; repeat for several, or `all` (default: the store's only hook)")]
OutHook = Annotated[list[str] | None, typer.Option(
    help="hook a transcoder or CLT predicts, one per --hook in the same order (e.g. --hook "
         "blocks.0.ln2.hook_normalized --out-hook blocks.0.hook_mlp_out)")]
Tokens = Annotated[str | None, typer.Option(
    help="training tokens, e.g. 50M or 2e8 (default: every row once)")]
BatchSize = Annotated[str, typer.Option(help="activations per training step, e.g. 4096 or 4k")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto")]
Seed = Annotated[int, typer.Option(help="seed for SAE init and batch order")]
Resume = Annotated[bool, typer.Option(help="continue the killed sweep in --out")]
Overwrite = Annotated[bool, typer.Option(help="replace the sweep in --out")]
CkptEvery = Annotated[str, typer.Option(help="checkpoint every N steps, e.g. 2000 or 2k (0: never)")]
LogEvery = Annotated[str, typer.Option(help="write metrics every N steps")]
Wandb = Annotated[str | None, typer.Option(help="also log to this W&B project")]
Config = Annotated[Path | None, typer.Option(help="TOML file listing the members explicitly")]
DataParallel = Annotated[bool, typer.Option(
    help="under torchrun: train every member on every rank, each rank on an equal share of "
         "every batch (gradients averaged), instead of spreading the members over the ranks; "
         "--batch-size must be divisible by the number of ranks")]
Kernels = Annotated[str, typer.Option(
    help="TopK-family training step: torch (sparse: decode and gradients from the k selected "
         "latents only, torch's CSR kernels), triton (the same with Triton kernels, CUDA), "
         "dense, or auto (sparse from width 512 on while k <= width / 16, where it is faster; "
         "triton on CUDA where it is installed)")]
Stack = Annotated[str, typer.Option(
    help="train members that differ only in optimizer settings (lr, betas, warm-up, decay, clip), "
         "resampling and loss weights (l1/aux/l0 coefficients), and share arch, hooks, width and "
         "every other option, as one batched module: on, off, or auto (on for CUDA devices; "
         "same results as one by one)")]
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile",
    help="run each dictionary's dense forward through torch.compile (fused elementwise ops; "
         "mostly a GPU gain; the first step compiles, which takes a while)")]
Precision = Annotated[str, typer.Option(
    help="dtype of the dictionaries' matmuls: fp32, bf16 or fp16 (autocast; weights, Adam "
         "state and losses stay fp32; fp16 with loss scaling)")]
Normalize = Annotated[bool, typer.Option(
    "--normalize/--no-normalize",
    help="scale each hook's activations by sqrt(d_in) / mean norm while training (Anthropic April "
         "2024 update), folded back into the saved weights; --no-normalize trains on raw "
         "activations")]


Arch = Annotated[str | None, typer.Option(
    help="architectures, comma-separated: " + ", ".join(REGISTRY) + " (crosscoders read all "
         "the chosen hooks; transcoders and CLTs predict the --out-hook hooks)")]
Width = Annotated[str | None, typer.Option(help="widths (latents), e.g. 4096,8192")]
Expansion = Annotated[str | None, typer.Option(
    help="widths as multiples of d_in (summed over a crosscoder's or CLT's hooks), e.g. 8,16")]
ResampleAt = Annotated[str | None, typer.Option(
    help="fractions of training at which to resample (default 0.25,0.5,0.75)")]
Param = Annotated[list[str] | None, typer.Option(
    help="any hyperparameter as NAME=V1,V2 (repeatable), e.g. bandwidth=0.001 or "
         "dec_init_norm=0.08,0.2")]


def hyperparameter_options() -> list[inspect.Parameter]:
    """One `--flag` option per hyperparameter declared with a flag (train_sae/params.py),
    its help naming the architectures that take it."""
    options = []
    for p in PARAMS.values():
        if p.flag is None:
            continue
        archs = [a for a in REGISTRY if applies(a, p.name)]
        text = p.help + (f" ({', '.join(archs)})" if len(archs) < len(REGISTRY) else "")
        options.append(inspect.Parameter(
            p.name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[str | None, typer.Option(f"--{p.flag}", help=text)]))
    return options


def with_params(command):
    """`command(**fixed, hyperparameters)` with the hyperparameter options added to its
    signature, so typer offers them."""
    sig = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)  # the Annotated options
    fixed = [q.replace(annotation=hints[q.name]) for q in sig.parameters.values()
             if q.kind != inspect.Parameter.VAR_KEYWORD]
    params = fixed + hyperparameter_options()
    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {q.name: q.annotation for q in params}
    return command


def _train(single: bool, store: str, storage_option: list[str] | None, out: Path,
           hook: list[str] | None, out_hook: list[str] | None, tokens: str | None,
           batch_size: str, device: str, seed: int, resume: bool, overwrite: bool,
           checkpoint_every: str, log_every: str, wandb_project: str | None, normalize: bool,
           data_parallel: bool, kernels: str, precision: str, stack: str, compile_step: bool,
           config: Path | None,
           arch: str | None,
           width: str | None,
           expansion: str | None, param: list[str] | None, resample_at: str | None,
           flags: dict[str, str | None]) -> None:
    check_out(out)
    batch = parse_count(batch_size)
    options = parse_storage_options(storage_option or [])
    location(store, options, option="--store")  # a remote store is reachable (one quick probe)
    cfg = TrainConfig(store=store, out=str(out), hooks=tuple(hook or ()),
                      out_hooks=tuple(out_hook or ()),
                      tokens=parse_count(tokens) if tokens is not None else None,
                      batch_size=batch, device=device, seed=seed,
                      checkpoint_every=parse_count(checkpoint_every),
                      log_every=parse_count(log_every),
                      wandb_project=wandb_project, resume=resume, overwrite=overwrite,
                      normalize=normalize, data_parallel=data_parallel, kernels=kernels,
                      precision=precision, stack=stack, compile=compile_step,
                      storage_options=options)
    # every value typed here, where it enters (a bad one fails before the store is opened)
    values = {name: parse_values(name, v) for name, v in flags.items() if v is not None}
    for item in param or []:
        name, sep, vals = item.partition("=")
        name = name.strip()
        if not sep or not name:
            fail(f"--param {item!r} is not NAME=V1,V2; e.g. --param bandwidth=0.001,0.01")
        if name in values:
            fail(f"{name} is given twice (as {PARAMS[name].label} and --param); give it once")
        values[name] = parse_values(name, vals)
    spec = None  # the grid; None: the members are listed in --config
    if config is not None:
        if arch or width or expansion or values or resample_at:
            fail("give either --config or grid options (--arch, --width, ...), not both")
    elif not arch:
        fail("no architecture given; pass --arch (e.g. --arch topk) or --config sweep.toml")
    else:
        at = tuple(parse_list(resample_at, "--resample-at", float)) if resample_at \
            else DEFAULT_RESAMPLE_AT
        spec = GridSpec(archs=parse_list(arch, "--arch", str),
                        widths=parse_list(width, "--width", int) if width else [],
                        expansions=parse_list(expansion, "--expansion", float) if expansion else [],
                        values=values, resample_at=at)
    # one process, or this rank of a torchrun sweep; its block is every rank's work, so one
    # rank's failure stops them all (shared/distributed.py)
    with distributed.init(resolve_device(cfg.device)) as world:
        plan = prepare(cfg, world)
        if spec is None:
            members = load_toml(config, plan.d_in, batch, plan.total_steps, plan.d_out)
        else:
            members = expand_grid(spec, plan.d_in, batch, plan.total_steps, plan.d_out)
        if single and len(members) != 1:
            fail(f"`train-sae run` trains one SAE but the options describe {len(members)}; "
                 "give one value per option or use `train-sae sweep`")
        results = train(cfg, plan, members, world)
        if world.is_main:
            _print_results(results)
    if all(r.status == "failed" for r in results):  # every rank has every result: the same code
        raise typer.Exit(EXIT_ALL_FAILED)


def _print_results(results: list[MemberResult]) -> None:
    for r in results:
        line = f"{r.status:6s} {r.name}"
        if r.status == "done":
            line += f"  fvu {r.final['fvu']:.4f}  l0 {r.final['l0']:.1f}  " \
                    f"dead {r.final['dead_fraction']:.3f}"
            line += "".join(f"  {k} {v:.4f}" for k, v in r.final.items() if k.startswith("fvu/"))
        else:
            line += f"  ({r.failure})"
        typer.echo(line)
    if all(r.status == "failed" for r in results):
        print(f"error: every member failed ({len(results)}); their failures are listed above "
              "and in each metrics.json", file=sys.stderr)


def _train_command(single: bool):
    """The `sweep` command, or `run` (`single`: the options must describe exactly one SAE)."""

    def command(
        store: Store, out: Out, hook: Hook = None, out_hook: OutHook = None,
        storage_option: StorageOption = None, tokens: Tokens = None,
        batch_size: BatchSize = "4096", device: Device = "auto", seed: Seed = 0,
        resume: Resume = False, overwrite: Overwrite = False, checkpoint_every: CkptEvery = "0",
        log_every: LogEvery = "100", wandb_project: Wandb = None, normalize: Normalize = True,
        data_parallel: DataParallel = False, kernels: Kernels = "auto",
        precision: Precision = "fp32", stack: Stack = "auto", compile: Compile = False,
        config: Config = None,
        arch: Arch = None,
        width: Width = None, expansion: Expansion = None, resample_at: ResampleAt = None,
        param: Param = None, **flags: str | None,
    ) -> None:
        _train(single, store, storage_option, out, hook, out_hook, tokens, batch_size, device,
               seed, resume, overwrite, checkpoint_every, log_every, wandb_project, normalize,
               data_parallel, kernels, precision, stack, compile, config, arch, width,
               expansion, param,
               resample_at, flags)

    return with_params(command)


app.command("sweep", help="Train a grid (or a TOML list) of SAEs on the same batches in one "
            "pass.")(_train_command(single=False))
app.command("run", help="Train one SAE (the one-member case of `sweep`).")(
    _train_command(single=True))


# `train-sae eval` and `train-sae report` live in train_sae/cli_eval.py (evaluation and report)
app.command("eval")(eval_command)
app.command("report")(report_command)
# `train-sae features` (the feature browser) lives in train_sae/evaluation/features/command.py
app.command("features")(features_command)


def main() -> None:
    with distributed.exit_together():  # under torchrun, ranks that fail together exit together
        run_cli(app)


if __name__ == "__main__":
    main()
