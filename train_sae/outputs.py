"""What a sweep writes: the sweep folder and sweep.json, and each member's folder.

    OUT/sweep.json                 store, hooks, steps, settings, members; status running/complete
    OUT/checkpoint.pt              while running, when --checkpoint-every is set
    OUT/<member>/metrics.jsonl     training-time metrics, one line per logged step
    OUT/<member>/metrics.json      status, hyperparameters, "final" metrics (last 10% of steps)
    OUT/<member>/cfg.json + ...    the trained SAE (SAELens format, train_sae/saving.py) or
                                   crosscoder (train_sae/crosscoder/saving.py)
    OUT/<member>/relative_norms.*  two-hook crosscoders: relative decoder norms (values, histogram)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from shared.atomic import atomic_write_text
from shared.errors import fail
from shared.store import Manifest
from train_sae.checkpoint import load_checkpoint
from train_sae.config import MemberConfig, TrainConfig
from train_sae.crosscoder import save_crosscoder, save_relative_norms
from train_sae.member import Member
from train_sae.metrics import FeatureDensity
from train_sae.saving import save_sae

SWEEP_JSON = "sweep.json"
METRICS_JSON = "metrics.json"
RESUME_KEYS = ("store", "hooks", "total_steps", "settings", "members")


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
    """Save a finished member's weights (scaling folded in) and, for a two-hook crosscoder, its
    relative decoder norms."""
    sparsity = log_density(m.final_density)
    if m.cfg.is_crosscoder:
        save_crosscoder(m.sae, folder,  # type: ignore[arg-type]
                        models=[model_and_hook(manifest, h)[0] for h in m.hooks],
                        sparsity=sparsity, input_scales=[scales[h] for h in m.hooks],
                        extra_cfg={"sweep_member": m.name,
                                   "training": m.cfg.hyperparameters()})
        if len(m.hooks) == 2:  # the model-diffing view; W_dec in training units, as trained
            m.relative_norms = save_relative_norms(m.sae.W_dec, m.sae.splits,  # type: ignore
                                                   m.hooks, folder)
        return
    (hook,) = m.hooks
    model, model_hook = model_and_hook(manifest, hook)
    extra = {"sweep_member": m.name, **m.cfg.hyperparameters()}
    if model_hook != hook:
        extra["store_hook"] = hook
    save_sae(m.sae, folder, hook=model_hook, model=model, d_in=dims[hook], extra_cfg=extra,
             sparsity=sparsity, input_scale=scales[hook])


def write_member_json(out: Path, m: Member, dims: dict[str, int], batch_size: int, steps: int,
                      scales: dict[str, float] | None = None) -> None:
    done = m.status == "done"
    cc = m.cfg.is_crosscoder
    doc: dict[str, Any] = {
        "name": m.name, "arch": m.cfg.arch,
        "hook": None if cc else m.hooks[0], "hooks": list(m.hooks),
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
    write_json(out / m.name / METRICS_JSON, doc)


def sweep_description(cfg: TrainConfig, store_hooks: list[str], dims: dict[str, int],
                      model: str, total_steps: int, members: list[MemberConfig]
                      ) -> dict[str, Any]:
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite", "out")}
    settings["store"] = str(Path(cfg.store).resolve())
    return {
        "store": str(Path(cfg.store).resolve()),
        "hook": ", ".join(store_hooks), "hooks": list(store_hooks), "d_in": dict(dims),
        "model": model, "total_steps": total_steps,
        "tokens": total_steps * cfg.batch_size, "settings": settings,
        "members": [m.to_dict() for m in members], "status": "running",
    }


def prepare_out(out: Path, cfg: TrainConfig, doc: dict[str, Any]) -> dict[str, Any] | None:
    """Create or reuse the sweep folder; returns the checkpoint to resume from, if any."""
    sweep_file = out / SWEEP_JSON
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()):
        if not sweep_file.exists():
            fail(f"--out {out} is not empty and holds no sweep; choose an empty or new folder")
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            fail(f"--out {out} already holds a sweep; pass --resume to continue it or "
                 "--overwrite to replace it")
    elif cfg.resume:
        fail(f"--resume: {out} holds no sweep to resume; drop --resume to start one")
    if cfg.resume and sweep_file.exists():
        old = json.loads(sweep_file.read_text())
        if old.get("status") == "complete":
            fail(f"the sweep in {out} is already complete; use --overwrite to train it again")
        same = {k: old.get(k) for k in RESUME_KEYS}
        new = {k: doc[k] for k in RESUME_KEYS}
        if same != new:
            diff = [k for k in same if same[k] != new[k]]
            fail(f"--resume: the options differ from the sweep in {out} ({', '.join(diff)}); "
                 "rerun with the same options, or use --overwrite to start again")
        return load_checkpoint(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(sweep_file, doc)
    return None


def mark_complete(out: Path, results: dict[str, str]) -> None:
    doc = json.loads((out / SWEEP_JSON).read_text())
    doc["status"] = "complete"
    doc["results"] = results
    write_json(out / SWEEP_JSON, doc)


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
