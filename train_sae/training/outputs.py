"""What a sweep writes: the sweep folder and sweep.json, and each member's folder.

    OUT/sweep.json                 store, hooks, steps, settings, members; status running/complete
    OUT/checkpoint.pt              while running, when --checkpoint-every is set
    OUT/<member>/metrics.jsonl     training-time metrics, one line per logged step
    OUT/<member>/metrics.json      status, hyperparameters, "final" metrics (last 10% of steps)
    OUT/<member>/cfg.json + ...    the trained SAE or transcoder (SAELens format,
                                   train_sae/training/saving.py), crosscoder (crosscoder_saving.py)
                                   or CLT (clt_saving.py); load any with loading.load_dictionary
    OUT/<member>/relative_norms.*  two-hook crosscoders: relative decoder norms (values, histogram)

Under torchrun, rank 0 owns the sweep folder (its lock, sweep.json, the checkpoint, the final
status) and each member's folder is written by the rank that trains it (rank 0 for every member
with --data-parallel); the files are those of a one-process sweep.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write_text
from shared.errors import fail
from shared.fingerprint import short
from shared.lock import LOCK_FILE
from shared.storage import as_location
from shared.store import Manifest, store_fingerprint
from train_sae.evaluation.crosscoder_metrics import (
    RELATIVE_NORMS_FILE,
    RELATIVE_NORMS_PLOT,
    save_relative_norms,
)
from train_sae.evaluation.metrics import FeatureDensity
from train_sae.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from train_sae.training.clt_saving import WEIGHTS_FILE as CLT_WEIGHTS
from train_sae.training.clt_saving import save_clt
from train_sae.training.config import MemberConfig, TrainConfig
from train_sae.training.crosscoder_saving import WEIGHTS_FILE as CROSSCODER_WEIGHTS
from train_sae.training.crosscoder_saving import save_crosscoder
from train_sae.training.member import Member
from train_sae.training.metrics_log import METRICS_JSONL
from train_sae.training.saving import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME, save_sae

SWEEP_JSON = "sweep.json"
METRICS_JSON = "metrics.json"
RESUME_KEYS = ("hooks", "total_steps", "settings", "members")  # and the store's fingerprint
REPORT_MD, PARETO_PNG, DENSITY_PNG = "report.md", "pareto.png", "density.png"  # train_sae/evaluation/report.py
REPORT_FILES = (REPORT_MD, PARETO_PNG, DENSITY_PNG)


def model_and_hook(manifest: Manifest, hook: str) -> tuple[str, str]:
    """(model, hook name inside that model) of a store hook. A store caching several models
    names hooks `<tag>/<hook>` and lists the models by tag in model_info["models"]."""
    models = manifest.model_info.get("models")
    tag, sep, inner = hook.partition("/")
    if sep and isinstance(models, dict) and tag in models:
        return str(models[tag]), inner
    return manifest.model, hook


def log_density(d: FeatureDensity) -> torch.Tensor:
    """[d_sae] log10 firing density as SAELens stores it (+1e-10 so dead latents stay finite)."""
    return torch.log10(d.density().cpu().double() + 1e-10).float()


def save_member(m: Member, folder: Path, manifest: Manifest, dims: dict[str, int],
                scales: dict[str, float]) -> None:
    """Save a finished member's weights (scaling folded in) in its architecture's format and,
    for a two-hook crosscoder, its relative decoder norms."""
    sparsity = log_density(m.final_density)
    kind = m.cfg.io_kind
    models = [model_and_hook(manifest, h)[0] for h in m.hooks]
    if kind == "crosscoder":
        save_crosscoder(m.sae, folder,  # type: ignore[arg-type]
                        models=models, sparsity=sparsity,
                        input_scales=[scales[h] for h in m.hooks],
                        extra_cfg={"sweep_member": m.name,
                                   "training": m.cfg.hyperparameters()})
        if len(m.hooks) == 2:  # the model-diffing view; W_dec in training units, as trained
            m.relative_norms = save_relative_norms(m.sae.W_dec, m.sae.splits,  # type: ignore
                                                   m.hooks, folder)
        return
    if kind == "clt":
        save_clt(m.sae, folder, models=models, sparsity=sparsity,  # type: ignore[arg-type]
                 input_scales=[scales[h] for h in m.hooks],
                 output_scales=[scales[h] for h in m.cfg.outputs],
                 extra_cfg={"sweep_member": m.name, "training": m.cfg.hyperparameters()})
        return
    (hook,) = m.hooks
    model, model_hook = model_and_hook(manifest, hook)
    extra = {"sweep_member": m.name, **m.cfg.hyperparameters()}
    if model_hook != hook:
        extra["store_hook"] = hook
    out_hook = output_scale = None
    if kind == "transcoder":
        (store_out,) = m.cfg.outputs
        out_hook = model_and_hook(manifest, store_out)[1]
        output_scale = scales[store_out]
        if out_hook != store_out:
            extra["store_out_hook"] = store_out
    save_sae(m.sae, folder, hook=model_hook, model=model, d_in=dims[hook], extra_cfg=extra,
             sparsity=sparsity, input_scale=scales[hook], out_hook=out_hook,
             output_scale=output_scale)


def write_member_json(out: Path, m: Member, dims: dict[str, int], batch_size: int, steps: int,
                      scales: dict[str, float] | None = None) -> None:
    done = m.status == "done"
    cc = m.cfg.io_kind in ("crosscoder", "clt")  # several input hooks
    doc: dict[str, Any] = {
        "name": m.name, "arch": m.cfg.arch, "sparsity": m.cfg.sparsity,
        "hook": None if cc else m.hooks[0], "hooks": list(m.hooks),
        "out_hooks": list(m.cfg.out_hooks),
        "d_in": sum(dims[h] for h in m.hooks), "d_sae": m.cfg.d_sae,
        "hyperparameters": m.cfg.hyperparameters(),
        "status": m.status, "failure": m.failure,
        "tokens": steps * batch_size,
        "steps": steps,
        "final": m.final_metrics() if done else None,
        "final_measured_on": "scaled activations (x * input_scale): mse is in scaled units, "
                             "the other metrics are scale-invariant",
        "resampled": m.resampled if m.resample_steps else None,
    }
    if cc:
        doc["d_in_per_hook"] = {h: dims[h] for h in m.hooks}
        doc["input_scales"] = {h: scales[h] for h in m.hooks} if scales else None
        if m.relative_norms is not None:
            doc["relative_norms"] = m.relative_norms
    else:
        doc["input_scale"] = scales[m.hooks[0]] if scales else None
    if m.cfg.out_hooks:
        doc["d_out_per_hook"] = {h: dims[h] for h in m.cfg.out_hooks}
        doc["output_scales"] = {h: scales[h] for h in m.cfg.out_hooks} if scales else None
    write_json(out / m.name / METRICS_JSON, doc)


def store_name(store: str) -> str:
    """How sweep.json names the store: its resolved local path, or its URL."""
    loc = as_location(store)
    return str(loc.local_path.resolve()) if loc.local_path is not None else loc.url


def sweep_description(cfg: TrainConfig, store_hooks: list[str], dims: dict[str, int],
                      manifest: Manifest, total_steps: int, members: list[MemberConfig]
                      ) -> dict[str, Any]:
    # how the sweep is run (resuming, over how many ranks, members stacked or not, compiled or
    # not) is not a setting: the same sweep
    settings = {k: v for k, v in cfg.to_dict().items()
                if k not in ("resume", "overwrite", "out", "store", "data_parallel", "stack",
                             "compile", "storage_options")}
    # eval checks its model by content; None = imported activations (no model to check)
    model_fp = ({"model_fingerprint": manifest.fingerprints["model"]}
                if "model" in manifest.fingerprints else {})
    return {
        "store": store_name(cfg.store),
        # the store by content: a --resume or an eval on another store under this path refuses
        "store_fingerprint": store_fingerprint(manifest),
        "dataset_fingerprint": manifest.fingerprints.get("dataset"), **model_fp,
        "hook": ", ".join(store_hooks), "hooks": list(store_hooks), "d_in": dict(dims),
        "model": manifest.model, "total_steps": total_steps,
        "tokens": total_steps * cfg.batch_size, "settings": settings,
        "members": [m.to_dict() for m in members], "status": "running",
    }


def prepare_out(out: Path, cfg: TrainConfig, doc: dict[str, Any]) -> dict[str, Any] | None:
    """Create or reuse the sweep folder; returns the checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; choose a folder path")
    old = read_sweep(out) if (out / SWEEP_JSON).exists() else None
    if out.exists() and _entries(out):
        if old is None:
            fail(f"--out {out} is not empty and holds no sweep; choose an empty or new folder")
        if cfg.overwrite:
            remove_sweep(out, old)
            old = None
        elif not cfg.resume:
            fail(f"--out {out} already holds a sweep; pass --resume to continue it or "
                 "--overwrite to replace it")
    elif cfg.resume:  # as cache-acts: a run stopped before writing anything starts afresh
        print(f"note: {out} holds no sweep yet; starting it", file=sys.stderr)
    if cfg.resume and old is not None:
        if old.get("status") == "complete":
            fail(f"the sweep in {out} is already complete; use --overwrite to train it again")
        check_same_sweep(old, doc, out)
        if old.get("store") != doc["store"]:  # the same store, moved: eval looks for it there
            write_json(out / SWEEP_JSON, {**old, "store": doc["store"]})
        ckpt = load_checkpoint(out)
        if ckpt is not None and ckpt.get("store_fingerprint") != doc["store_fingerprint"]:
            fail(f"checkpoint {out / CHECKPOINT_NAME} was written while training on another "
                 "store than the one now at --store; resume with that store or use --overwrite")
        return ckpt
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_JSON, doc)
    return None


def check_same_sweep(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """A --resume must train the same members on the same store content."""
    if old.get("store_fingerprint") != new["store_fingerprint"]:
        fail(f"--resume: the store at {new['store']} is not the one the sweep in {out} was "
             f"trained on (content fingerprint {short(old.get('store_fingerprint'))}, now "
             f"{short(new['store_fingerprint'])}); resume with the original store or use "
             "--overwrite to start again")
    diff = [k for k in RESUME_KEYS if old.get(k) != new[k]]
    if diff:
        fail(f"--resume: the options differ from the sweep in {out} ({', '.join(diff)}); "
             "rerun with the same options, or use --overwrite to start again")


def read_sweep(folder: Path) -> dict[str, Any]:
    """sweep.json of a sweep folder, or one line saying it is damaged."""
    return read_json(folder / SWEEP_JSON, "sweep description")


def member_names(doc: dict[str, Any]) -> list[str]:
    """The members a sweep description lists, by name (older ones list bare names)."""
    return [m if isinstance(m, str) else str(m.get("name")) for m in doc.get("members", [])]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object this project wrote, or one line naming the damaged file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"the {what} {path} cannot be read ({e}); restore it, or retrain with --overwrite")
    if not isinstance(doc, dict):
        fail(f"the {what} {path} is not a JSON object; restore it, or retrain with --overwrite")
    return doc


# Names a sweep writes: in the sweep folder, and in each member's folder (with their `.tmp`
# siblings from atomic writes). --overwrite removes these and nothing else.
SWEEP_FILES = frozenset({SWEEP_JSON, CHECKPOINT_NAME, *REPORT_FILES, "wandb"})
MEMBER_FILES = frozenset({METRICS_JSON, METRICS_JSONL, CFG_FILENAME, WEIGHTS_FILENAME,
                          SPARSITY_FILENAME, CROSSCODER_WEIGHTS, CLT_WEIGHTS, RELATIVE_NORMS_FILE,
                          RELATIVE_NORMS_PLOT})


def remove_sweep(out: Path, doc: dict[str, Any]) -> None:
    """Delete the sweep described by `doc` for --overwrite: its own files only. Anything else
    in the folder (or a member folder) is named in a refusal, before anything is deleted."""
    members = set(member_names(doc))
    ours, foreign = [], []
    for p in out.iterdir():
        name = p.name.removesuffix(".tmp")
        if name == LOCK_FILE:
            continue  # held by this run: removing it would let a second writer in
        if name in SWEEP_FILES or _saving_folder_of(name, members):
            ours.append(p)
        elif name in members and p.is_dir():
            inside = [q for q in p.iterdir() if q.name.removesuffix(".tmp") not in MEMBER_FILES]
            foreign += inside
            ours += [q for q in p.iterdir() if q not in inside] + [p]
        else:
            foreign.append(p)
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:5])
        fail(f"refusing to overwrite the sweep in {out}: it holds files train-sae did not write "
             f"({names}); move them away or choose another --out")
    for p in ours:  # files before their folders
        if p.is_dir() and (p.name == "wandb" or _saving_folder_of(p.name, members)):
            shutil.rmtree(p)
        elif p.is_dir():
            p.rmdir()
        else:
            p.unlink()


def _saving_folder_of(name: str, members: set[Any]) -> bool:
    """A saving folder left by a killed run: `.<member>.<random>` (crosscoder and CLT saving
    write there and rename it into place, shared/atomic.py write_folder_files)."""
    return name.startswith(".") and any(name.startswith(f".{m}.") for m in members)


def _entries(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} - {LOCK_FILE}


def mark_complete(out: Path, results: dict[str, str]) -> None:
    doc = read_sweep(out)
    doc["status"] = "complete"
    doc["results"] = results
    write_json(out / SWEEP_JSON, doc)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
