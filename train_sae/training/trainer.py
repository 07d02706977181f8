"""The one-pass sweep: every batch from one loader is fed to every member (dictionary_learning's
multi-trainer loop). A member whose loss turns NaN/inf or diverges is stopped and marked failed;
the others go on unchanged. `train-sae run` is the one-member case of the same loop.

    plan = prepare(cfg)                      # open the store, pick the hooks, count steps
    members = expand_grid(spec, plan.d_in, cfg.batch_size, plan.total_steps, plan.d_out)
    results = train(cfg, plan, members)      # writes OUT/<member>/ and OUT/sweep.json

Several hooks are read together: one loader over all of them yields {hook: [batch, d_h]} per
step, so each row block is read once whatever the number of hooks and members; an SAE member
trains on its hook, a crosscoder on all of its hooks (train_sae/training/member.py, `Member.inputs`).

Under `torchrun` (a `shared.distributed.World` of several ranks, passed to `prepare` and `train`)
the members are spread over the ranks, balanced by cost (`place`: greedy longest-processing-time
on width x (d_in + d_out), so `--hook all` over a model's layers is spread like sparsify's
`--distribute_layers`). Every rank builds the same loader over the hooks its own members read, so
every rank sees the same batches, and a member trains to the same bytes on any rank as in one
process (train_sae/training/member.py). With `--data-parallel` every rank trains every member on its share
of each batch instead (`ShardedBatch`: gradients and batch statistics reduced over the ranks).
Rank 0 owns the sweep folder: it holds the lock, writes sweep.json, gathers the member states
into the one checkpoint and marks the sweep complete; each member's folder is written by the
rank that trains it (rank 0 with --data-parallel). The ranks meet before every step
(`World.agree`), so a rank that fails stops them all there with one line naming it.

Before anything is written, each rank estimates the peak memory of the members it trains
(train_sae/training/memory.py: weights, gradients, Adam state, the largest step, the batches):
rank 0 prints it per member, and a sweep that would not fit its device is refused with one line.

Metrics in metrics.jsonl / metrics.json are measured on the scaled activations the members
train on (x_h * input_scale_h, input_scale_h = sqrt(d_h) / mean_norm_h, or 1 with
--no-normalize): l0, fvu, cos_sim and l2_ratio are scale-invariant; mse is in scaled units (divide
by input_scale**2 for raw units).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.distributed import LOCAL, World, balance
from shared.errors import fail
from shared.lock import exclusive
from shared.storage import location
from shared.store import Store, open_store
from train_sae.dictionaries.base import WHOLE_BATCH, BatchGroup, ShardedBatch, TrainProgress
from train_sae.training import memory
from train_sae.training.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from train_sae.training.config import ALL_HOOKS, MemberConfig, TrainConfig
from train_sae.training.loader import ActivationLoader
from train_sae.training.member import Member
from train_sae.training.metrics_log import MetricsLog, Progress, WandbSink
from train_sae.training.outputs import (
    METRICS_JSON,
    SWEEP_JSON,
    mark_complete,
    prepare_out,
    save_member,
    sweep_description,
    write_member_json,
)
from train_sae.training.resampling import BatchPool
from train_sae.training.stack import MemberStack, Stacks, stack_groups
from train_sae.training.sweep import check_hooks

RESAMPLE_POOL_ROWS = 32768  # inputs kept per hook for Anthropic resampling (shared by members)


@dataclass
class Plan:
    store: Store
    hooks: list[str]  # the chosen hooks (--hook), in order
    d_in: dict[str, int]  # hook -> d_in of the chosen hooks
    total_steps: int
    batch_size: int
    device: str  # this rank's device
    d_out: dict[str, int] = field(default_factory=dict)  # --out-hook -> width, in order

    @property
    def dims(self) -> dict[str, int]:
        """Every hook the sweep reads or predicts -> its width."""
        return {**self.d_in, **self.d_out}


def prepare(cfg: TrainConfig, world: World = LOCAL) -> Plan:
    """Open the store, choose the hooks and device, and turn the token budget into steps."""
    store = open_store(location(cfg.store, cfg.storage_options, option="--store", check=False))
    hooks = choose_hooks(store, cfg.hooks)
    for hook in cfg.out_hooks:
        store.check_hook(hook)
    if cfg.batch_size > store.n_rows:
        fail(f"--batch-size {cfg.batch_size} is larger than the store's {store.n_rows} rows; "
             "choose a smaller batch")
    tokens = store.n_rows if cfg.tokens is None else cfg.tokens
    total_steps = tokens // cfg.batch_size
    if total_steps < 1:
        fail(f"--tokens {tokens} is less than one batch of {cfg.batch_size}; raise --tokens")
    return Plan(store, hooks, {h: store.manifest.d_in[h] for h in hooks}, total_steps,
                cfg.batch_size, world.device(resolve_device(cfg.device)),
                {h: store.manifest.d_in[h] for h in cfg.out_hooks})


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


def bind_hooks(m: MemberConfig, plan: Plan) -> MemberConfig:
    """Fill in the hooks of a member made without them: the sweep's only hook for an SAE, all
    of the sweep's hooks for a crosscoder, and its --out-hook hooks for a transcoder or CLT."""
    hooks = plan.hooks
    if not m.hooks:
        if m.io_kind in ("crosscoder", "clt") or len(hooks) == 1:
            m = dataclasses.replace(m, hooks=tuple(hooks))
        else:
            fail(f"member {m.name} names no hook but the sweep reads several "
                 f"({', '.join(hooks)}); give it one")
    if m.io_kind in ("transcoder", "clt") and not m.out_hooks:
        m = dataclasses.replace(m, out_hooks=tuple(plan.d_out))
    check_hooks([m.arch], list(m.hooks), list(m.out_hooks))
    assert set(m.hooks) <= set(hooks) and set(m.out_hooks) <= set(plan.d_out), m
    return m


@dataclass
class MemberResult:
    name: str
    status: str  # "done" | "failed"
    failure: str | None
    folder: Path
    final: dict[str, float] = field(default_factory=dict)


# --- who trains what under torchrun -------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """This rank's part of a sweep."""

    trains: tuple[int, ...]  # the members it trains, as indices into the sweep's list
    writes: bool  # whether it writes their folders and holds their checkpoint state
    rows: slice  # its rows of each batch
    batch: BatchGroup  # who holds each batch's rows (data parallel: every rank a share)
    all_members: bool  # whether it trains every member (one process, or data parallel)
    owner: tuple[int, ...] = ()  # members spread over ranks: the rank of each member
    costs: tuple[int, ...] = ()  # ... and each member's cost (member_cost)


def member_cost(m: MemberConfig, dims: dict[str, int]) -> int:
    """A member's share of a step: its encoder and decoder matmuls take about batch x width x
    (d_in + d_out) multiply-adds (each summed over its hooks)."""
    return m.d_sae * (sum(dims[h] for h in m.hooks) + sum(dims[h] for h in m.outputs))


def place(members: list[MemberConfig], dims: dict[str, int], batch_size: int, world: World,
          data_parallel: bool) -> Placement:
    """Spread the members over the ranks by cost, or (data parallel) give every rank every
    member and a share of each batch's rows."""
    everyone = tuple(range(len(members)))
    if not world.distributed:
        return Placement(everyone, True, slice(None), WHOLE_BATCH, all_members=True)
    n_ranks = world.world_size
    if data_parallel:
        if batch_size % n_ranks:
            fail(f"--data-parallel splits each batch of {batch_size} rows (--batch-size) over "
                 f"{n_ranks} ranks; choose a batch size divisible by {n_ranks}")
        share = batch_size // n_ranks
        return Placement(everyone, world.is_main, slice(world.rank * share,
                                                        (world.rank + 1) * share),
                         ShardedBatch(world), all_members=True)
    if len(members) < n_ranks:
        fail(f"{n_ranks} ranks would share {len(members)} member(s), leaving some with nothing to "
             f"train; start at most {len(members)} (torchrun --nproc-per-node), or train every "
             "member on every rank with --data-parallel")
    costs = tuple(member_cost(m, dims) for m in members)
    owner = tuple(balance(costs, n_ranks))
    return Placement(tuple(i for i in everyone if owner[i] == world.rank), True, slice(None),
                     WHOLE_BATCH, all_members=False, owner=owner, costs=costs)


def describe_placement(p: Placement, world: World, batch_size: int) -> str | None:
    """One line on how the ranks share the sweep (None in one process)."""
    if not world.distributed:
        return None
    n = world.world_size
    if p.all_members:
        return (f"data-parallel over {n} ranks: each trains every member on {batch_size // n} "
                f"rows of each batch, gradients averaged")
    loads = [sum(c for c, o in zip(p.costs, p.owner, strict=True) if o == r) for r in range(n)]
    per_rank = [f"rank {r} trains {p.owner.count(r)} (cost {loads[r]})" for r in range(n)]
    return (f"members spread over {n} ranks by cost (width x (d_in + d_out)): "
            + ", ".join(per_rank))


# --- the sweep ----------------------------------------------------------------------------------
def train(cfg: TrainConfig, plan: Plan, members_cfg: list[MemberConfig], world: World = LOCAL
          ) -> list[MemberResult]:
    """Train every member on the same batches in one pass; write run folders and sweep.json.
    One writer at a time: the sweep folder is locked while it is written (shared/lock.py), by
    rank 0 under torchrun. Every rank calls this with the same arguments; all return the
    results of every member."""
    out = Path(cfg.out)
    members_cfg = [bind_hooks(m, plan) for m in members_cfg]
    placement = place(members_cfg, plan.dims, cfg.batch_size, world, cfg.data_parallel)
    lock = exclusive(out, "train-sae") if world.is_main else contextlib.nullcontext()
    with lock:  # refused before writing anything: no folder left behind
        return _train_locked(cfg, plan, members_cfg, placement, out, world)


def _train_locked(cfg: TrainConfig, plan: Plan, members_cfg: list[MemberConfig],
                  placement: Placement, out: Path, world: World) -> list[MemberResult]:
    torch.manual_seed(cfg.seed)
    members = [Member(members_cfg[i], plan.dims, plan.total_steps, cfg.seed, plan.device,
                      cfg.diverge_factor, placement.batch, cfg.step_options())
               for i in placement.trains]  # builds (and validates) every model before writing
    read = [h for h in plan.dims if any(h in m.hooks or h in m.cfg.outputs for m in members)]
    check_memory(cfg, plan, placement, members, read, world)  # refused before writing
    sweep_doc = sweep_description(cfg, plan.hooks, plan.dims, plan.store.manifest,
                                  plan.total_steps, members_cfg)
    world.agree()  # every rank built its members: now rank 0 may write
    ckpt = open_sweep(out, cfg, sweep_doc, world)
    start = 0
    if ckpt is not None:
        start = ckpt["step"]
        torch.set_rng_state(ckpt["torch_rng"])
        for m in members:
            m.load_state_dict(ckpt["members"][m.name])
    if placement.writes:
        open_member_logs(out, members, ckpt, plan, start)

    # a data-parallel rank reads only its share of each batch's rows
    loader = ActivationLoader(plan.store, read, cfg.batch_size, plan.total_steps, seed=cfg.seed,
                              device=plan.device, start_batch=start, normalize=cfg.normalize,
                              rows=placement.rows)
    pools = make_pools(members, loader, plan, start)
    run = SweepRun(cfg, plan, out, world, placement, members, [m.name for m in members_cfg],
                   sweep_doc["store_fingerprint"],
                   stacks=Stacks(use_stacking(cfg, plan.device)))
    if world.is_main:
        if cfg.wandb_project:
            run.wandb = WandbSink(cfg.wandb_project, out.name, sweep_doc, out,
                                  run_id=ckpt.get("wandb_run_id") if ckpt else None)
        hooks_text = ", ".join(f"{h} (d {plan.dims[h]})" for h in plan.dims
                               if any(h in m.hooks or h in m.outputs for m in members_cfg))
        print(f"training {len(members_cfg)} member(s) on {hooks_text} for {plan.total_steps} "
              f"steps of {cfg.batch_size} on {plan.device}"
              + (f", resuming at step {start}" if start else "") + f" -> {out}", file=sys.stderr)
        spread = describe_placement(placement, world, cfg.batch_size)
        if spread:
            print(spread, file=sys.stderr)
        for names in check_stacks(cfg, plan, members):
            print(f"stacked (one batched step): {', '.join(names)}", file=sys.stderr)
    bar = Progress(plan.total_steps * cfg.batch_size, start * cfg.batch_size, cfg.batch_size,
                   enabled=cfg.progress and world.is_main)
    try:
        run.train_steps(loader, pools, start, bar)
    finally:
        bar.close()
        for m in members:
            if m.log:
                m.log.close()
    results = run.finish(loader.scales)
    if run.wandb:
        run.wandb.finish()
    return results


def check_memory(cfg: TrainConfig, plan: Plan, placement: Placement, members: list[Member],
                 read: list[str], world: World) -> None:
    """Each rank estimates the peak memory of its members (train_sae/training/memory.py) and
    refuses if it would not fit its device, with one line; the other ranks stop with it at
    their next meeting point, with one line each. When every rank fits, rank 0 prints each
    member's memory and every rank's peak against what its device has available."""
    rows = len(range(cfg.batch_size)[placement.rows])
    stacks = check_stacks(cfg, plan, members)
    mine = memory.sweep_memory(members, rows, cfg.batch_size, {h: plan.dims[h] for h in read},
                               plan.device, RESAMPLE_POOL_ROWS, plan.store.manifest.dtype,
                               world.rank, total_rows=plan.total_steps * cfg.batch_size,
                               stacks=stacks)
    everyone = world.all_gather_object(mine)
    memory.check_fits(mine)
    if world.is_main and all(memory.fits(r) for r in everyone):
        memory.print_lines(memory.describe(everyone))


def open_sweep(out: Path, cfg: TrainConfig, doc: dict[str, Any], world: World
               ) -> dict[str, Any] | None:
    """Rank 0 prepares the sweep folder (create, check, overwrite or resume: prepare_out); then
    every rank has the checkpoint to resume from, if any (the others read the file it chose)."""
    ckpt = prepare_out(out, cfg, doc) if world.is_main else None
    resuming = world.broadcast_object(ckpt is not None)
    if not world.is_main and not (out / SWEEP_JSON).exists():
        fail(f"rank {world.rank} does not see {out / SWEEP_JSON}, which rank 0 has just written: "
             "every rank writes its members' folders into --out, so it must be one folder that "
             "every node shares (a shared filesystem)")
    if resuming and ckpt is None:
        ckpt = load_checkpoint(out)
    return ckpt


def open_member_logs(out: Path, members: list[Member], ckpt: dict[str, Any] | None, plan: Plan,
                     start: int) -> None:
    """Each member's metrics.jsonl, cut back to its checkpoint; a stale metrics.json removed."""
    for m in members:
        m.log = MetricsLog(out / m.name,
                           truncate_to=ckpt["members"][m.name]["log_offset"] if ckpt else None)
        if ckpt is None or m.status == "failed":
            (out / m.name / METRICS_JSON).unlink(missing_ok=True)
        if m.status == "failed":
            write_member_json(out, m, plan.dims, plan.batch_size, start)


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
            batch = loader.batch(i, whole=True)
            for h, pool in pools.items():
                pool.add(batch[h].to(plan.device))
    return pools


@dataclass
class SweepRun:
    """One rank's part of a sweep while it trains: its members and the ranks' meeting points
    (every step, log steps, checkpoints, the end)."""

    cfg: TrainConfig
    plan: Plan
    out: Path
    world: World
    placement: Placement
    members: list[Member]  # the members this rank trains
    names: list[str]  # every member of the sweep, in order
    store_fingerprint: dict[str, Any]
    wandb: WandbSink | None = None  # rank 0's
    stacks: Stacks = field(default_factory=lambda: Stacks(enabled=False))  # --stack
    last_fvu: dict[str, float] = field(default_factory=dict)
    best_fvu: float | None = None  # the best running member's last FVU, for the progress bar

    def train_steps(self, loader: ActivationLoader, pools: dict[str, BatchPool], start: int,
                    bar: Progress) -> None:
        batches = iter(loader)
        total = self.plan.total_steps
        try:
            for step in range(start, total):
                live = [m for m in self.members if m.status == "running"]
                if not live and self.placement.all_members:
                    break  # every member failed; nothing left to train
                batch = next(batches) if live else None  # {hook: [batch, d_h]}, scaled
                self.world.agree()  # every rank holds its batch (or one failed: all stop here)
                log = (step + 1) % self.cfg.log_every == 0 or step + 1 == total
                records = self.step(live, batch, step, pools, log) if live else {}
                if log and not self.share_log(step, records):
                    break  # no member runs on any rank
                bar.update(self.best_fvu)
                done = step + 1
                every = self.cfg.checkpoint_every
                if every and done % every == 0 and done < total:
                    self.checkpoint(done)
        finally:
            batches.close()  # stops the loader's thread

    def step(self, live: list[Member], batch: dict[str, torch.Tensor], step: int,
             pools: dict[str, BatchPool], log: bool) -> dict[str, dict[str, Any]]:
        """Train the live members on one batch; their metrics records at a log step."""
        progress = TrainProgress(step, self.plan.total_steps, step * self.cfg.batch_size)
        # `batch` is this rank's share of the rows (placement.rows): all of them, or a
        # data-parallel rank's slice
        by_name: dict[str, tuple[torch.Tensor, dict[str, Any] | None]] = {}
        for group in self.stacks.groups(live):
            if len(group) == 1:
                by_name[group[0].name] = group[0].step(batch, step, progress, pools, log)
            else:
                by_name.update(stacked_step(self.stacks.get(group), batch, step, progress,
                                            pools, log))
        stepped = [by_name[m.name] for m in live]
        for hook, pool in pools.items():
            # whole batches: resampling draws the same rows on every rank (the slices of the
            # ranks, in rank order, are the batch)
            pool.add(self.placement.batch.whole(batch[hook]))
        losses = torch.stack([loss.float() for loss, _ in stepped]).tolist()  # one sync
        records: dict[str, dict[str, Any]] = {}
        for m, loss, (_, rec) in zip(live, losses, stepped, strict=True):
            m.check(loss, step)
            if m.status == "failed":
                if self.placement.writes:
                    write_member_json(self.out, m, self.plan.dims, self.plan.batch_size, step)
            elif rec is not None:
                if m.log:
                    m.log.write(rec)
                records[m.name] = rec
        return records

    def share_log(self, step: int, records: dict[str, dict[str, Any]]) -> bool:
        """A log step: every rank's new records (rank 0 shows the best FVU and logs to W&B) and
        which members still run; False when none does, on any rank."""
        running = [m.name for m in self.members if m.status == "running"]
        everyone = self.world.all_gather_object((records if self.placement.writes else {},
                                                 running))
        merged = {name: rec for recs, _ in everyone for name, rec in recs.items()}
        still = {name for _, names in everyone for name in names}
        for name in self.names:
            if name in merged:
                self.last_fvu[name] = merged[name]["fvu"]
                if self.wandb:
                    self.wandb.log(name, merged[name], step)
        fvus = [self.last_fvu[n] for n in self.names if n in still and n in self.last_fvu]
        self.best_fvu = min(fvus) if fvus else None
        return bool(still)

    def checkpoint(self, done: int) -> None:
        """Every member's state at step `done`, gathered by rank 0 into the one checkpoint."""
        self.stacks.release()  # each member's tensors in their own storage
        mine = {m.name: m.state_dict() for m in self.members} if self.placement.writes else {}
        if self.world.distributed:
            mine = _to_cpu(mine)  # sent through pickles: no rank's GPU tensors on rank 0
        gathered = self.world.gather_object(mine)
        if gathered is None:
            return  # not rank 0
        states = {name: s for part in gathered for name, s in part.items()}
        save_checkpoint(self.out, {"step": done, "torch_rng": torch.get_rng_state(),
                                   "store_fingerprint": self.store_fingerprint,
                                   "members": {n: states[n] for n in self.names},
                                   "wandb_run_id": self.wandb.run_id if self.wandb else None})

    def finish(self, scales: dict[str, float]) -> list[MemberResult]:
        """Save the finished members this rank writes; once every rank has, rank 0 marks the
        sweep complete. Every rank returns every member's result, in sweep order."""
        self.stacks.release()
        mine = []
        for m in self.members:
            folder = self.out / m.name
            if m.status == "running":
                if self.placement.writes:
                    save_member(m, folder, self.plan.store.manifest, self.plan.dims, scales)
                m.status = "done"
            if self.placement.writes:
                write_member_json(self.out, m, self.plan.dims, self.plan.batch_size,
                                  self.plan.total_steps, scales)
                mine.append(MemberResult(m.name, m.status, m.failure, folder,
                                         m.final_metrics() if m.status == "done" else {}))
        by_name = {r.name: r for part in self.world.all_gather_object(mine) for r in part}
        results = [by_name[n] for n in self.names]
        if self.world.is_main:
            mark_complete(self.out, {r.name: r.status for r in results})
            remove_checkpoint(self.out)
        self.world.agree()  # complete on every rank (or rank 0 failed to mark it: all stop)
        return results


def stacked_step(stack: MemberStack, batch: dict[str, torch.Tensor], step: int,
                 progress: TrainProgress, pools: dict[str, BatchPool], log: bool
                 ) -> dict[str, tuple[torch.Tensor, dict[str, Any] | None]]:
    """`Member.step` for the members of a stack: one joint forward and backward between each
    member's own start of the step and its own optimizer step and metrics."""
    x, y = [m.begin_step(batch, step, pools) for m in stack.members][0]  # the same hooks
    outs = stack.forward_backward(x, y, progress)
    done = {}
    for m, out in zip(stack.members, outs, strict=True):
        loss = m.apply_gradients(out.loss)
        done[m.name] = (loss, m.record(out, y, step, loss, log))
    return done


def check_stacks(cfg: TrainConfig, plan: Plan, members: list[Member]) -> list[tuple[str, ...]]:
    """The names of the members that will train stacked, stack by stack."""
    if not use_stacking(cfg, plan.device):
        return []
    running = [m for m in members if m.status == "running"]  # a resumed sweep's failed ones not
    return [tuple(m.name for m in g) for g in stack_groups(running) if len(g) > 1]


def use_stacking(cfg: TrainConfig, device: str) -> bool:
    """--stack on / off, or auto: where one batched step beats the members' steps in turn."""
    if cfg.stack != "auto":
        return cfg.stack == "on"
    return torch.device(device).type == "cuda"


def _to_cpu(obj: Any) -> Any:
    """A nested state (dicts, lists, tuples of tensors and plain values) with its tensors on the
    CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
