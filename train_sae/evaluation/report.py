"""The sweep report: `SWEEP/report.md` (a table of every member), `SWEEP/pareto.png` (L0 against
FVU and, once `train-sae eval` ran, against loss recovered, Pareto frontiers marked) and
`SWEEP/density.png` (one log10 feature-density histogram per member).

Members of every kind (SAEs, transcoders, CLTs, crosscoders) share the table; one predicting
several hooks (a crosscoder, a CLT) gets its FVU per hook from training, and a crosscoder
evaluated one hook at a time its loss recovered per hook. The Pareto plot has one row of panels,
and one frontier, per set of activations predicted: SAEs by their hook, transcoders by their
(input -> output) hooks, each crosscoder's or CLT's hook set its own, so that no panel compares
reconstructions of different activations. Two-hook crosscoders (model diffing) get a section with
their relative-decoder-norm histogram and counts.

Reads only run folders (`metrics.json`, `sparsity.safetensors`, `relative_norms.png`) and
`sweep.json`.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.transforms  # noqa: E402
import torch  # noqa: E402

from shared.atomic import atomic_write_text  # noqa: E402
from shared.errors import fail  # noqa: E402
from train_sae.dictionaries import REGISTRY, io_kind  # noqa: E402
from train_sae.evaluation.crosscoder_metrics import RELATIVE_NORMS_PLOT, hook_labels  # noqa: E402
from train_sae.training.outputs import (  # noqa: E402
    DENSITY_PNG,
    METRICS_JSON,
    PARETO_PNG,
    REPORT_MD,
    SWEEP_JSON,
    member_names,
    read_json,
    read_sweep,
)
from train_sae.training.saving import read_log10_density  # noqa: E402

DEAD_LOG10 = -9.5  # log10 densities at or below this (SAELens stores log10(density + 1e-10)) are dead


@dataclass
class Member:
    """What the report needs from one run folder."""

    name: str
    folder: Path
    arch: str
    d_sae: int
    hyperparameters: dict[str, Any]
    status: str  # "done" | "failed"
    failure: str | None
    tokens: int
    final: dict[str, float]
    eval: dict[str, Any] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)  # the hooks it reads (several: a crosscoder)
    out_hooks: list[str] = field(default_factory=list)  # the hooks it predicts, if not `hooks`
    relative_norms: dict[str, Any] | None = None  # two-hook crosscoders: the summary counts

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def kind(self) -> str:
        """Its io_kind ("sae", "transcoder", "clt", "crosscoder"); "" for an unknown arch."""
        return io_kind(self.arch) if self.arch in REGISTRY else ""

    @property
    def is_crosscoder(self) -> bool:
        return self.kind == "crosscoder"

    @property
    def predicted(self) -> list[str]:
        """The hooks it predicts: its output hooks (a transcoder, a CLT), else those it reads."""
        return self.out_hooks or self.hooks

    @property
    def group(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(hooks read, hooks predicted): members compared on one Pareto panel share it."""
        return tuple(self.hooks), tuple(self.predicted)

    def hook_fvus(self) -> list[tuple[str, float]]:
        """(short hook label, final FVU of that hook) of each hook it predicts, in its order."""
        hooks = self.predicted
        labels = list(hook_labels(*hooks)) if len(hooks) == 2 else hooks
        return [(lab, _get(self.final, f"fvu/{h}")) for lab, h in zip(labels, hooks, strict=True)]

    def hook_recovered(self) -> list[tuple[str, float]]:
        """(short hook label, loss recovered vs zero ablation) of each hook eval spliced alone
        (a crosscoder's `per_hook`)."""
        per_hook = self.eval.get("per_hook") or {}
        hooks = list(per_hook)
        labels = list(hook_labels(*hooks)) if len(hooks) == 2 else hooks
        return [(lab, _get(per_hook[h], "loss_recovered_zero"))
                for lab, h in zip(labels, hooks, strict=True)]


@dataclass
class ReportFiles:
    report: Path
    pareto: Path
    density: Path | None
    table: str  # the markdown table, also printed by the CLI


def member_folders(sweep: Path) -> list[Path]:
    """Run folders of a sweep, in sweep.json's order when it lists them, else sorted by name."""
    if not sweep.is_dir():
        fail(f"{sweep} is not a folder; pass the --out folder of `train-sae sweep` or `train-sae run`")
    if (sweep / METRICS_JSON).exists():  # a single run folder
        return [sweep]
    names: list[str] = []
    if (sweep / SWEEP_JSON).exists():
        doc = read_sweep(sweep)
        names = member_names(doc)
        if doc.get("status", "complete") != "complete":
            fail(unfinished_message(sweep, names))
    found = sorted(p.parent.name for p in sweep.glob(f"*/{METRICS_JSON}"))
    ordered = [n for n in names if n in found] + [n for n in found if n not in names]
    if not ordered:
        fail(f"no run folders with {METRICS_JSON} under {sweep}; train with `train-sae sweep --out "
             f"{sweep}` first")
    return [sweep / n for n in ordered]


def unfinished_message(sweep: Path, names: list[str]) -> str:
    """One line saying that a sweep is unfinished and the state of every member: members are
    saved when the sweep ends, so until then only failed ones have results."""
    states = {}
    for n in names:
        try:
            states[n] = json.loads((sweep / n / METRICS_JSON).read_text()).get("status", "?")
        except (OSError, ValueError):
            states[n] = "unfinished"
    counts = ", ".join(f"{sum(v == s for v in states.values())} {s}"
                       for s in dict.fromkeys(states.values()))
    listing = "; ".join(f"{n}: {s}" for n, s in states.items())
    return (f"the sweep in {sweep} is unfinished (still running, or killed): {len(names)} "
            f"members ({counts}): {listing}; finish it with `train-sae sweep ... --resume`")


def load_member(folder: Path) -> Member:
    m = read_json(folder / METRICS_JSON, "member metrics")
    return Member(
        name=m.get("name", folder.name), folder=folder, arch=m.get("arch", "?"),
        d_sae=int(m.get("d_sae", 0)), hyperparameters=dict(m.get("hyperparameters", {})),
        status=m.get("status", "?"), failure=m.get("failure"), tokens=int(m.get("tokens", 0)),
        final=dict(m.get("final") or {}), eval=dict(m.get("eval") or {}),
        hooks=list(m.get("hooks") or ([m["hook"]] if m.get("hook") else [])),
        out_hooks=list(m.get("out_hooks") or []),
        relative_norms=m.get("relative_norms"),
    )


def load_members(sweep: Path) -> list[Member]:
    return [load_member(f) for f in member_folders(Path(sweep))]


# --- Pareto frontier -----------------------------------------------------------------------------
def pareto_front(l0: Sequence[float], quality: Sequence[float], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (lower L0, better quality),
    sorted by L0. NaN points are never on the frontier; identical points are both kept."""
    sign = -1.0 if higher_is_better else 1.0  # turn quality into a cost
    pts = [(x, sign * q, i) for i, (x, q) in enumerate(zip(l0, quality, strict=True))
           if not (math.isnan(x) or math.isnan(q))]
    front = []
    for x, c, i in pts:
        dominated = any(x2 <= x and c2 <= c and (x2 < x or c2 < c) for x2, c2, _ in pts)
        if not dominated:
            front.append((x, c, i))
    return [i for _, _, i in sorted(front)]


# --- table ---------------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, list):
        return ",".join(fmt(x) for x in v)
    return str(v)


def split_hyperparameters(members: list[Member]) -> tuple[list[str], dict[str, Any]]:
    """Hyperparameter names whose value differs between members (table columns), and the ones
    every member shares (listed once above the table)."""
    keys: list[str] = []
    for m in members:
        keys += [k for k in m.hyperparameters if k not in keys and k != "width"]
    varying, shared = [], {}
    for k in keys:
        values = {json.dumps(m.hyperparameters.get(k)) for m in members}
        if len(values) == 1 and all(k in m.hyperparameters for m in members):
            shared[k] = members[0].hyperparameters[k]
        else:
            varying.append(k)
    return varying, shared


def _get(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def group_label(group: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    """"hook" (an SAE), "a, b" (a crosscoder), "in -> out" (a transcoder, a CLT); one hook of
    several layers is written once: "blocks.{0..3}.hook_mlp_out"."""
    read, predicted = group
    if read == predicted:
        return _hooks_label(read)
    return f"{_hooks_label(read)} -> {_hooks_label(predicted)}"


def _hooks_label(hooks: Sequence[str]) -> str:
    found = [_BLOCK.match(h) for h in hooks]
    if len(hooks) < 2 or not all(found) or len({m.group(2) for m in found}) != 1:  # type: ignore
        return ", ".join(hooks)
    layers = [int(m.group(1)) for m in found]  # type: ignore[union-attr]
    run = layers == list(range(layers[0], layers[0] + len(layers))) and len(layers) > 2
    spelled = f"{layers[0]}..{layers[-1]}" if run else ",".join(map(str, layers))
    return f"blocks.{{{spelled}}}.{found[0].group(2)}"  # type: ignore[union-attr]


_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def frontier_groups(members: list[Member]) -> dict[tuple, list[Member]]:
    """The finished members by the activations they read and predict (`Member.group`), in sweep
    order: a frontier compares members predicting the same activations from the same ones only
    (an SAE at another layer, a transcoder, a crosscoder over several hooks reconstruct
    different activations)."""
    groups: dict[tuple, list[Member]] = {}
    for m in members:
        if m.ok and m.kind:
            groups.setdefault(m.group, []).append(m)
    return groups


def markdown_table(members: list[Member]) -> str:
    varying, _ = split_hyperparameters(members)
    evaluated = any(m.eval for m in members)
    several = any(m.ok and len(m.predicted) > 1 for m in members)
    per_hook_eval = any(m.eval.get("per_hook") for m in members)
    on_fvu: set[str] = set()
    on_lr: set[str] = set()
    for ok in frontier_groups(members).values():  # the Pareto frontiers' points, one set per group
        on_fvu |= {ok[i].name for i in pareto_front([_get(m.final, "l0") for m in ok],
                                                     [_get(m.final, "fvu") for m in ok], False)}
        on_lr |= {ok[i].name for i in pareto_front(
            [_get(m.eval, "l0") for m in ok], [_get(m.eval, "loss_recovered_zero") for m in ok],
            True)}
    head = ["member", "arch", "width", *varying, "status", "L0", "FVU", "dead", "dense"]
    if several:
        head.append("FVU per hook")
    if evaluated:
        head += ["eval L0", "eval FVU", "loss rec. (zero)", "loss rec. (mean)", "KL", "CE spliced"]
    if per_hook_eval:
        head.append("loss rec. (zero) per hook")
    head.append("frontier")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in members:
        cells = [m.name, m.arch, str(m.d_sae), *(fmt(m.hyperparameters.get(k)) for k in varying)]
        if not m.ok:
            reason = (m.failure or "no reason recorded").replace("|", "/").splitlines()[0][:80]
            cells.append(f"**{m.status}**: {reason}")
            cells += ["-"] * (len(head) - len(cells))
        else:
            f = m.final
            cells += ["done", fmt(f.get("l0")), fmt(f.get("fvu")), fmt(f.get("dead_fraction")),
                      fmt(f.get("dense_fraction"))]
            if several:
                cells.append(", ".join(f"{lab} {fmt(v)}" for lab, v in m.hook_fvus())
                             if len(m.predicted) > 1 else "-")
            if evaluated:
                e = m.eval
                cells += [fmt(e.get("l0")), fmt(e.get("fvu")), fmt(e.get("loss_recovered_zero")),
                          fmt(e.get("loss_recovered_mean")), fmt(e.get("kl")), fmt(e.get("ce_sae"))]
            if per_hook_eval:
                cells.append(", ".join(f"{lab} {fmt(v)}" for lab, v in m.hook_recovered())
                             or "-")
            marks = (["FVU"] if m.name in on_fvu else []) + (["loss"] if m.name in on_lr else [])
            cells.append(", ".join(marks) or "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# --- plots ---------------------------------------------------------------------------------------
def _panel(ax: Any, members: list[Member], xs: list[float], ys: list[float], ylabel: str,
           higher_is_better: bool, title: str) -> list[tuple[str, float, float]]:
    """Draw one L0-vs-quality panel; returns the (name, x, y) points to label once the figure's
    layout is final (`_label` places labels in display coordinates)."""
    archs = sorted({m.arch for m in members})
    colors = {a: f"C{i}" for i, a in enumerate(archs)}
    usable = [i for i, (x, y) in enumerate(zip(xs, ys, strict=True)) if x > 0 and math.isfinite(y)]
    for a in archs:
        idx = [i for i in usable if members[i].arch == a]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], color=colors[a], label=a, zorder=3)
    front = pareto_front([xs[i] for i in usable], [ys[i] for i in usable], higher_is_better)
    fx = [xs[usable[j]] for j in front]
    fy = [ys[usable[j]] for j in front]
    ax.plot(fx, fy, "--", color="0.4", linewidth=1, zorder=2, label="Pareto frontier")
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors="0.2", zorder=4)
    ax.set_xscale("log")
    lo, hi = min((xs[i] for i in usable), default=1.0), max((xs[i] for i in usable), default=10.0)
    ax.set_xlim(lo / 1.5, hi * 4)  # room on the right for the labels
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_label))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if not usable:
        ax.text(0.5, 0.5, "no finished member to plot", transform=ax.transAxes, ha="center")
    return [(members[i].name, xs[i], ys[i]) for i in usable]


def _minor_label(v: float, _: int) -> str:
    """Label only the 2x and 5x minor ticks of a log axis, so labels never collide."""
    lead = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
    return f"{v:g}" if lead in (2.0, 5.0) else ""


# label offsets from a point (points) and alignment: right, then left, then further above/below
_LABEL_SPOTS = [(5, 2, "left", "bottom"), (5, -2, "left", "top"), (-5, 2, "right", "bottom"),
                (-5, -2, "right", "top"), (5, 11, "left", "bottom"), (5, -11, "left", "top"),
                (-5, 11, "right", "bottom"), (-5, -11, "right", "top"), (5, 20, "left", "bottom"),
                (5, -20, "left", "top")]
_MARKER_PT = 6.5  # half the size of the frontier ring around a point, in points


def _label(ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Name every point: each label goes to the first spot of `_LABEL_SPOTS` where it stays
    inside the axes and overlaps no label placed before, no point marker and not the legend
    (if there is no such spot, the first one). Call after the figure's layout is final."""
    renderer = ax.figure.canvas.get_renderer()
    px = ax.figure.dpi / 72  # pixels per point
    xy = ax.transData.transform([(x, y) for _, x, y in points]) if points else []
    r = _MARKER_PT * px
    markers = [matplotlib.transforms.Bbox([[x - r, y - r], [x + r, y + r]]) for x, y in xy]
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    frame = ax.get_window_extent(renderer)
    for i in sorted(range(len(points)), key=lambda j: (points[j][1], -points[j][2])):
        name, x, y = points[i]
        others = taken + [b for j, b in enumerate(markers) if j != i]
        for spot in _LABEL_SPOTS:
            text, box = _annotate(ax, name, x, y, spot, renderer)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) \
                    and not any(box.overlaps(o) for o in others):
                break
            text.remove()
        else:  # crowded everywhere: the first spot
            text, box = _annotate(ax, name, x, y, _LABEL_SPOTS[0], renderer)
        taken.append(box)


def _annotate(ax: Any, name: str, x: float, y: float, spot: tuple[int, int, str, str],
              renderer: Any) -> tuple[Any, Any]:
    dx, dy, ha, va = spot
    text = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                       fontsize=7)
    return text, text.get_window_extent(renderer)


def plot_pareto(members: list[Member], path: Path) -> None:
    """L0 vs FVU (and vs loss recovered once evaluated) of the finished members, one row of
    panels per set of activations read and predicted (`frontier_groups`)."""
    groups = frontier_groups(members) or {((), ()): []}
    n = 2 if any(m.eval for ok in groups.values() for m in ok) else 1
    fig, axes = plt.subplots(len(groups), n, figsize=(6.5 * n, 5 * len(groups)), squeeze=False)
    to_label = []
    for row, (group, ok) in zip(axes, groups.items(), strict=True):
        at = "\n" + textwrap.fill(group_label(group), 72) if len(groups) > 1 else ""
        to_label.append((row[0], _panel(
            row[0], ok, [_get(m.final, "l0") for m in ok], [_get(m.final, "fvu") for m in ok],
            "FVU (lower is better)", False, "end of training: L0 vs FVU" + at)))
        if n == 2:
            evaluated = [m for m in ok if m.eval]
            to_label.append((row[1], _panel(
                row[1], evaluated, [_get(m.eval, "l0") for m in evaluated],
                [_get(m.eval, "loss_recovered_zero") for m in evaluated],
                "loss recovered vs zero ablation (higher is better)", True,
                "held-out tokens, spliced into the model" + at)))
    fig.tight_layout()
    for ax, points in to_label:
        _label(ax, points)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_density(members: list[Member], path: Path) -> bool:
    """One histogram per member of log10 feature density; dead latents counted in the title."""
    data = [(m, d) for m in members if m.ok and (d := read_log10_density(m.folder)) is not None]
    if not data:
        return False
    cols = min(4, len(data))
    rows = -(-len(data) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (m, d) in zip(axes.flat, data, strict=False):
        dead = ~torch.isfinite(d) | (d <= DEAD_LOG10)
        alive = d[~dead]
        if alive.numel():
            ax.hist(alive.numpy(), bins=40, color="C0")
        ax.set_title(f"{m.name}\ndead {float(dead.float().mean()):.1%}", fontsize=8)
        ax.set_xlabel("log10 feature density", fontsize=8)
        ax.set_ylabel("latents", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- report.md -----------------------------------------------------------------------------------
def _settings_lines(sweep: Path) -> list[str]:
    if not (sweep / SWEEP_JSON).exists():
        return []
    s = read_sweep(sweep)
    lines = []
    for key in ("store", "hook", "hooks", "model", "tokens", "batch_size", "seed"):
        v = s.get(key, (s.get("settings") or {}).get(key))
        if v is not None:
            lines.append(f"- {key}: `{v}`")
    return lines


def _eval_lines(members: list[Member]) -> list[str]:
    done = [m.eval for m in members if m.eval]
    if not done:
        return ["Not evaluated yet: `train-sae eval SWEEP` adds CE loss recovered and KL "
                "(each member spliced into the model on held-out tokens)."]
    e = done[0]
    return [
        f"Evaluated on {e.get('n_tokens', '?')} held-out next-token predictions: "
        f"{e.get('tokens_source', 'see metrics.json')}.",
        f"Clean CE {fmt(e.get('ce_clean'))} nats; loss recovered = (CE ablated - CE spliced) / "
        "(CE ablated - CE clean), against zero ablation and against mean ablation "
        f"({e.get('mean_source', 'store mean')}) of the hooks the member replaces; "
        "KL = KL(clean || spliced) per token.",
        *_splice_lines({m.kind for m in members if m.eval}),
    ]


SPLICES = {
    "sae": "an SAE replaces its hook by its reconstruction",
    "transcoder": "a transcoder replaces its output hook by its prediction from its input hook, "
                  "read in the same pass",
    "clt": "a CLT replaces every output hook in one pass (the replacement model), layer t's "
           "prediction made from the inputs of layers 0..t read in that pass",
    "crosscoder": "a crosscoder replaces all its hooks together (the row's numbers) and each "
                  "hook alone (`loss rec. (zero) per hook`) by its reconstruction from their "
                  "clean activations",
}


def _splice_lines(kinds: set[str]) -> list[str]:
    """What each evaluated kind's splice replaces, when the sweep has more than SAEs."""
    if kinds <= {"sae"}:
        return []
    return ["Splices: " + "; ".join(SPLICES[k] for k in SPLICES if k in kinds) + "."]


def _crosscoder_lines(sweep: Path, members: list[Member]) -> list[str]:
    """What the table's rows of members predicting several hooks mean, and the model-diffing
    section of every finished two-hook crosscoder: its only-a / shared / only-b latent counts and
    relative-norm histogram."""
    several = [m for m in members if m.ok and len(m.predicted) > 1]
    lines = ["Crosscoders and CLTs: L0 and FVU over all the hooks they predict together, "
             "`FVU per hook` for each hook's block. On the Pareto plot each hook set has its own "
             "row of panels and frontier (an FVU over several hooks does not compare with one "
             "hook's SAE), as does each transcoder's input -> output pair.", ""] if several else []
    if not any(m.is_crosscoder for m in members):
        return lines
    diffing = [m for m in members if m.ok and m.is_crosscoder and m.relative_norms]
    if not diffing:
        return lines
    lines += ["## Model diffing: relative decoder norms", "",
              "Each latent's share of decoder norm in the second hook b against the first a, "
              "||W_dec[b]|| / (||W_dec[a]|| + ||W_dec[b]||): 0 = only in a, 0.5 = shared, "
              "1 = only in b.", ""]
    for m in diffing:
        r = m.relative_norms or {}
        a, b = r.get("labels") or hook_labels(*m.hooks)
        bins = r.get("bins", {})
        lines += [f"### {m.name}", "",
                  f"- only {a} ({bins.get('only_a', '?')}): {r.get('only_a', '?')}, "
                  f"shared ({bins.get('shared', '?')}): {r.get('shared', '?')}, "
                  f"only {b} ({bins.get('only_b', '?')}): {r.get('only_b', '?')} "
                  f"of {r.get('n_latents', '?')} latents"
                  + (f" ({r['zero']} with a zero decoder)" if r.get("zero") else ""), ""]
        plot = m.folder / RELATIVE_NORMS_PLOT
        if plot.exists():  # linked relative to report.md
            lines += [f"![relative decoder norms of {m.name}]({plot.relative_to(sweep).as_posix()})",
                      ""]
    return lines


def write_report(sweep: str | Path) -> ReportFiles:
    sweep = Path(sweep)
    members = load_members(sweep)
    table = markdown_table(members)
    _, shared = split_hyperparameters(members)
    pareto = sweep / PARETO_PNG
    plot_pareto(members, pareto)
    density = sweep / DENSITY_PNG
    has_density = plot_density(members, density)
    failed = [m.name for m in members if not m.ok]
    lines = [f"# Sweep report: {sweep.resolve().name}", "", *_settings_lines(sweep)]
    if shared:
        lines.append("- shared hyperparameters: " + ", ".join(f"{k}={fmt(v)}" for k, v in shared.items()))
    lines += [
        f"- members: {len(members)} ({len(members) - len(failed)} done, {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "") + ")",
        "", "## Members", "", table, "",
        "L0, FVU, dead and dense fractions: end of training (FVU = unexplained / total variance; "
        "dead = never fired in the last window; dense = fired on > 10% of tokens). "
        "`frontier`: on the Pareto frontier of L0 vs FVU and/or L0 vs loss recovered.", "",
        *_crosscoder_lines(sweep, members),
        "## Evaluation", "", *_eval_lines(members), "",
        "## Plots", "", "![L0 vs quality, Pareto frontier](pareto.png)", "",
    ]
    if has_density:
        lines += ["![log10 feature density per member](density.png)", ""]
    report = sweep / REPORT_MD
    atomic_write_text(report, "\n".join(lines))
    return ReportFiles(report, pareto, density if has_density else None, table)
