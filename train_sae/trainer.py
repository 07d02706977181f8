"""The one-pass sweep: every batch from one loader is fed to every member (dictionary_learning's
multi-trainer loop). A member whose loss turns NaN/inf or diverges is stopped and marked failed;
the others go on unchanged. `train-sae run` is the one-member case of the same loop.

    plan = prepare(cfg)                      # open the store, pick the hooks, count steps
    members = expand_grid(spec, plan.d_in, cfg.batch_size, plan.total_steps)
    results = train(cfg, plan, members)      # writes OUT/<member>/ and OUT/sweep.json

Several hooks are read together: one loader over all of them yields {hook: [batch, d_h]} per
step, so each row block is read once whatever the number of hooks and members; an SAE member
trains on its hook, a crosscoder on all of its hooks (train_sae/member.py, `Member.inputs`).

Metrics in metrics.jsonl / metrics.json are measured on the scaled activations the members
train on (x_h * input_scale_h, input_scale_h = sqrt(d_h) / mean_norm_h, or 1 with
--no-normalize): l0, fvu, cos_sim and l2_ratio are scale-invariant; mse is in scaled units (divide
by input_scale**2 for raw units).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.errors import fail
from shared.lock import exclusive
from shared.store import Store, open_store
from train_sae.checkpoint import remove_checkpoint, save_checkpoint
from train_sae.config import ALL_HOOKS, MemberConfig, TrainConfig
from train_sae.loader import ActivationLoader
from train_sae.logging import MetricsLog, Progress, WandbSink
from train_sae.member import Member
from train_sae.outputs import (
    METRICS_JSON,
    mark_complete,
    prepare_out,
    save_member,
    sweep_description,
    write_member_json,
)
from train_sae.resampling import BatchPool
from train_sae.saes.base import TrainProgress
from train_sae.sweep import check_crosscoder_hooks

RESAMPLE_POOL_ROWS = 32768  # inputs kept per hook for Anthropic resampling (shared by members)


@dataclass
class Plan:
    store: Store
    hooks: list[str]  # the chosen hooks, in order
    d_in: dict[str, int]  # hook -> d_in
    total_steps: int
    batch_size: int
    device: str


def prepare(cfg: TrainConfig) -> Plan:
    """Open the store, choose the hooks and device, and turn the token budget into steps."""
    store = open_store(cfg.store)
    hooks = choose_hooks(store, cfg.hooks)
    if cfg.batch_size > store.n_rows:
        fail(f"--batch-size {cfg.batch_size} is larger than the store's {store.n_rows} rows; "
             "choose a smaller batch")
    tokens = store.n_rows if cfg.tokens is None else cfg.tokens
    total_steps = tokens // cfg.batch_size
    if total_steps < 1:
        fail(f"--tokens {tokens} is less than one batch of {cfg.batch_size}; raise --tokens")
    return Plan(store, hooks, {h: store.manifest.d_in[h] for h in hooks}, total_steps,
                cfg.batch_size, resolve_device(cfg.device))


def choose_hooks(store: Store, given: tuple[str, ...]) -> list[str]:
    """--hook as given: none (the store's only hook), `all`, or names (each one checked)."""
    if not given:
        if len(store.hooks) != 1:
            fail(f"store {store.path} holds several hooks ({', '.join(store.hooks)}); choose one "
                 f"with --hook, several with repeated --hook, or every one with --hook {ALL_HOOKS}")
        return list(store.hooks)
    if given == (ALL_HOOKS,):
        return list(store.hooks)
    for hook in given:
        store.check_hook(hook)
    return list(given)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def bind_hooks(m: MemberConfig, hooks: list[str]) -> MemberConfig:
    """Fill in the hooks of a member made without them: the sweep's only hook for an SAE, all
    of the sweep's hooks for a crosscoder."""
    if not m.hooks:
        if m.is_crosscoder or len(hooks) == 1:
            m = dataclasses.replace(m, hooks=tuple(hooks))
        else:
            fail(f"member {m.name} names no hook but the sweep reads several "
                 f"({', '.join(hooks)}); give it one")
    if m.is_crosscoder:
        check_crosscoder_hooks([m.arch], list(m.hooks))
    assert m.is_crosscoder or len(m.hooks) == 1, m
    assert set(m.hooks) <= set(hooks), (m.hooks, hooks)
    return m


@dataclass
class MemberResult:
    name: str
    status: str  # "done" | "failed"
    failure: str | None
    folder: Path
    final: dict[str, float] = field(default_factory=dict)


# --- the sweep ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, plan: Plan, members_cfg: list[MemberConfig]) -> list[MemberResult]:
    """Train every member on the same batches in one pass; write run folders and sweep.json.
    One writer at a time: the sweep folder is locked while it is written (shared/lock.py)."""
    out = Path(cfg.out)
    with exclusive(out, "train-sae"):  # refused before writing anything: no folder left behind
        return _train_locked(cfg, plan, members_cfg, out)


def _train_locked(cfg: TrainConfig, plan: Plan, members_cfg: list[MemberConfig], out: Path
                  ) -> list[MemberResult]:
    torch.manual_seed(cfg.seed)
    members_cfg = [bind_hooks(m, plan.hooks) for m in members_cfg]
    members = [Member(m, plan.d_in, plan.total_steps, cfg.seed, plan.device, cfg.diverge_factor)
               for m in members_cfg]  # builds (and validates) every model before writing anything
    sweep_doc = sweep_description(cfg, plan.hooks, plan.d_in, plan.store.manifest,
                                  plan.total_steps, members_cfg)
    ckpt = prepare_out(out, cfg, sweep_doc)
    start = 0
    if ckpt is not None:
        start = ckpt["step"]
        torch.set_rng_state(ckpt["torch_rng"])
        for m in members:
            m.load_state_dict(ckpt["members"][m.name])
    for m in members:
        m.log = MetricsLog(out / m.name,
                           truncate_to=ckpt["members"][m.name]["log_offset"] if ckpt else None)
        if ckpt is None or m.status == "failed":
            (out / m.name / METRICS_JSON).unlink(missing_ok=True)
        if m.status == "failed":
            write_member_json(out, m, plan.d_in, plan.batch_size, start)

    read = [h for h in plan.hooks if any(h in m.hooks for m in members)]
    loader = ActivationLoader(plan.store, read, cfg.batch_size, plan.total_steps, seed=cfg.seed,
                              device=plan.device, start_batch=start, normalize=cfg.normalize)
    pools = make_pools(members, loader, plan, start)
    wandb = None
    if cfg.wandb_project:
        wandb = WandbSink(cfg.wandb_project, out.name, sweep_doc, out,
                          run_id=ckpt.get("wandb_run_id") if ckpt else None)
    hooks_text = ", ".join(f"{h} (d_in {plan.d_in[h]})" for h in read)
    print(f"training {len(members)} member(s) on {hooks_text} for {plan.total_steps} steps of "
          f"{cfg.batch_size} on {plan.device}" + (f", resuming at step {start}" if start else "")
          + f" -> {out}", file=sys.stderr)
    bar = Progress(plan.total_steps * cfg.batch_size, start * cfg.batch_size, cfg.batch_size,
                   enabled=cfg.progress)
    last_fvu: dict[str, float] = {}
    try:
        for step, batch in enumerate(loader, start=start):  # batch: {hook: [batch, d_h]}, scaled
            progress = TrainProgress(step, plan.total_steps, step * cfg.batch_size)
            live = [m for m in members if m.status == "running"]
            if not live:
                break  # every member failed; nothing left to train
            log = (step + 1) % cfg.log_every == 0 or step + 1 == plan.total_steps
            stepped = [m.step(batch, step, progress, pools, log) for m in live]
            for hook, pool in pools.items():
                pool.add(batch[hook])
            losses = torch.stack([loss.float() for loss, _ in stepped]).tolist()  # one sync
            for m, loss, (_, rec) in zip(live, losses, stepped, strict=True):
                m.check(loss, step)
                if m.status == "failed":
                    write_member_json(out, m, plan.d_in, plan.batch_size, step)
                elif rec is not None:
                    m.log.write(rec)  # type: ignore[union-attr]
                    last_fvu[m.name] = rec["fvu"]
                    if wandb:
                        wandb.log(m.name, rec, step)
            running = [last_fvu[m.name] for m in members
                       if m.status == "running" and m.name in last_fvu]
            bar.update(min(running) if running else None)
            done = step + 1
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < plan.total_steps:
                save_checkpoint(out, {"step": done, "torch_rng": torch.get_rng_state(),
                                      "store_fingerprint": sweep_doc["store_fingerprint"],
                                      "members": {m.name: m.state_dict() for m in members},
                                      "wandb_run_id": wandb.run_id if wandb else None})
    finally:
        bar.close()
        for m in members:
            if m.log:
                m.log.close()
    results = finish(out, members, plan, loader.scales)
    if wandb:
        wandb.finish()
    return results


def make_pools(members: list[Member], loader: ActivationLoader, plan: Plan, start: int
               ) -> dict[str, BatchPool]:
    """A resampling pool per hook that has a resampling member, refilled from the batches
    before `start` when resuming."""
    hooks = [h for h in loader.hooks if any(m.resample_steps and m.status == "running"
                                            and m.hooks[0] == h for m in members)]
    pools = {h: BatchPool(max(RESAMPLE_POOL_ROWS, plan.batch_size)) for h in hooks}
    if pools:
        n_back = -(-RESAMPLE_POOL_ROWS // plan.batch_size)
        for i in range(max(0, start - n_back), start):
            batch = loader.batch(i)
            for h, pool in pools.items():
                pool.add(batch[h].to(plan.device))
    return pools


def finish(out: Path, members: list[Member], plan: Plan, scales: dict[str, float]
           ) -> list[MemberResult]:
    results = []
    for m in members:
        folder = out / m.name
        if m.status == "running":
            save_member(m, folder, plan.store.manifest, plan.d_in, scales)
            m.status = "done"
        write_member_json(out, m, plan.d_in, plan.batch_size, plan.total_steps, scales)
        results.append(MemberResult(m.name, m.status, m.failure, folder,
                                    m.final_metrics() if m.status == "done" else {}))
    mark_complete(out, {r.name: r.status for r in results})
    remove_checkpoint(out)
    return results
