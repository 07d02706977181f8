"""Sweep report: Pareto frontier on hand-made points, report.md contents, plots written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shared.errors import UserError
from train_sae.evaluation.report import (
    group_label,
    load_members,
    markdown_table,
    pareto_front,
    write_report,
)


def test_pareto_front_lower_is_better():
    l0 = [10, 20, 5, 40, 20, 80]
    fvu = [0.3, 0.1, 0.5, 0.2, 0.1, 0.05]
    # (40, 0.2) is beaten by (20, 0.1); (20, 0.1) twice: both kept
    assert pareto_front(l0, fvu, higher_is_better=False) == [2, 0, 1, 4, 5]


def test_pareto_front_higher_is_better_and_nan():
    l0 = [10, 20, 30, 15, math.nan]
    rec = [0.5, 0.9, 0.8, 0.5, 0.99]
    # 30 -> 0.8 is beaten by 20 -> 0.9; 15 -> 0.5 by 10 -> 0.5; NaN is never on the frontier
    assert pareto_front(l0, rec, higher_is_better=True) == [0, 1]
    assert pareto_front([], [], True) == []


def _member(root: Path, name: str, arch: str, hp: dict, l0: float, fvu: float,
            status: str = "done", eval_: dict | None = None, seed: int = 0,
            hook: str = "blocks.0.hook_resid_post") -> None:
    d = root / name
    d.mkdir(parents=True)
    m = {"name": name, "arch": arch, "hook": hook, "d_in": 8, "d_sae": 32,
         "hyperparameters": {"width": 32, "lr": 1e-3, **hp}, "status": status,
         "failure": "loss became nan at step 7" if status == "failed" else None,
         "tokens": 4096, "steps": 16,
         "final": {} if status == "failed" else {"l0": l0, "mse": 0.1, "fvu": fvu, "cos_sim": 0.9,
                                                  "l2_ratio": 0.95, "dead_fraction": 0.25,
                                                  "dense_fraction": 0.0}}
    if eval_:
        m["eval"] = eval_
    (d / "metrics.json").write_text(json.dumps(m))
    if status == "done":
        g = torch.Generator().manual_seed(seed)
        dens = torch.rand(32, generator=g) * 3 - 4
        dens[:8] = math.log10(1e-10)  # 8 dead latents
        save_file({"sparsity": dens}, str(d / "sparsity.safetensors"))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _member(root, "topk-k4", "topk", {"k": 4}, 4.0, 0.4)
    _member(root, "topk-k8", "topk", {"k": 8}, 8.0, 0.2, seed=1)
    _member(root, "relu-l1-1e-3", "relu", {"l1_coefficient": 1e-3}, 12.0, 0.3, seed=2)
    _member(root, "relu-l1-1e6", "relu", {"l1_coefficient": 1e6}, 0, 0, status="failed")
    (root / "sweep.json").write_text(json.dumps({
        "members": ["topk-k4", "topk-k8", "relu-l1-1e-3", "relu-l1-1e6"],
        "store": "/data/store", "hook": "blocks.0.hook_resid_post"}))
    return root


def _add_eval(root: Path, name: str, l0: float, rec: float) -> None:
    p = root / name / "metrics.json"
    m = json.loads(p.read_text())
    m["eval"] = {"l0": l0, "fvu": 0.3, "loss_recovered_zero": rec, "loss_recovered_mean": rec - 0.1,
                 "kl": 0.05, "ce_sae": 3.1, "ce_clean": 3.0, "n_tokens": 508,
                 "tokens_source": "sequences 40..43 of the cached stream"}
    p.write_text(json.dumps(m))


def _rows(text: str) -> list[list[str]]:
    """Markdown table lines -> cells (header first, separator dropped)."""
    return [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("| ")]


def _png_size(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        return im.size


def test_report_without_eval(sweep: Path):
    files = write_report(sweep)
    text = files.report.read_text()
    rows = _rows(text)
    assert rows[0][:6] == ["member", "arch", "width", "k", "l1_coefficient", "status"]
    assert "loss rec. (zero)" not in rows[0]
    assert [r[0] for r in rows[1:]] == ["topk-k4", "topk-k8", "relu-l1-1e-3", "relu-l1-1e6"]
    row = {r[0]: r for r in rows[1:]}
    # topk-k8 (L0 8, FVU 0.2) beats relu (L0 12, FVU 0.3): relu is off the frontier
    assert row["topk-k8"][-1] == "FVU" and row["relu-l1-1e-3"][-1] == ""
    assert row["topk-k4"][3:8] == ["4", "-", "done", "4", "0.4"]
    assert row["relu-l1-1e-3"][3:5] == ["-", "0.001"]
    assert "**failed**: loss became nan at step 7" in row["relu-l1-1e6"]
    assert "- shared hyperparameters: lr=0.001" in text
    assert "1 failed: relu-l1-1e6" in text and "Not evaluated yet" in text
    assert "`/data/store`" in text
    assert files.table in text
    w1, _ = _png_size(files.pareto)
    assert files.density is not None and _png_size(files.density)[0] > 400
    # one panel only before eval; two after
    for name, l0, rec in (("topk-k4", 4.5, 0.7), ("topk-k8", 9.0, 0.95), ("relu-l1-1e-3", 11.0, 0.9)):
        _add_eval(sweep, name, l0, rec)
    files = write_report(sweep)
    assert _png_size(files.pareto)[0] > 1.6 * w1
    text = files.report.read_text()
    rows = _rows(text)
    assert rows[0][-7:] == ["eval L0", "eval FVU", "loss rec. (zero)", "loss rec. (mean)", "KL",
                            "CE spliced", "frontier"]
    relu = {r[0]: r for r in rows}["relu-l1-1e-3"]
    assert relu[-7:] == ["11", "0.3", "0.9", "0.8", "0.05", "3.1", ""]  # (11, .9) < (9, .95)
    assert {r[0]: r for r in rows}["topk-k8"][-1] == "FVU, loss"
    assert "sequences 40..43 of the cached stream" in text


def test_density_histogram_counts_dead(sweep: Path, monkeypatch):
    titles: list[str] = []
    import matplotlib.axes

    orig = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, t, *a, **k: (titles.append(t), orig(self, t, *a, **k))[1])
    write_report(sweep)
    assert sum("dead 25.0%" in t for t in titles) == 3  # 8 of 32, failed member skipped


def test_markdown_table_marks_loss_frontier_only_when_evaluated(sweep: Path):
    rows = _rows(markdown_table(load_members(sweep)))
    assert [r[-1] for r in rows[1:]] == ["FVU", "FVU", "", "-"]


def test_report_errors(tmp_path: Path):
    with pytest.raises(UserError, match="not a folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(UserError, match="no run folders"):
        write_report(tmp_path)
    bad = tmp_path / "s" / "m"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="metrics.json cannot be read"):
        write_report(tmp_path / "s")


def _crosscoder(root: Path, name: str, hooks: list[str], l0: float, fvus: list[float],
                counts: tuple[int, int, int] | None) -> None:
    """A finished crosscoder's folder as `train-sae sweep` writes it (metrics.json, sparsity,
    and for two hooks the relative-norm summary and histogram)."""
    d = root / name
    d.mkdir(parents=True)
    final = {"l0": l0, "fvu": sum(fvus) / len(fvus), "dead_fraction": 0.125,
             "dense_fraction": 0.0, **{f"fvu/{h}": v for h, v in zip(hooks, fvus, strict=True)}}
    m = {"name": name, "arch": "crosscoder", "hook": None, "hooks": hooks, "d_in": 16, "d_sae": 64,
         "hyperparameters": {"width": 64, "lr": 1e-3, "l1_coefficient": 0.1}, "status": "done",
         "failure": None, "tokens": 4096, "steps": 16, "final": final}
    if counts is not None:
        m["relative_norms"] = {"hooks": hooks, "labels": ["base", "chat"], "only_a": counts[0],
                               "shared": counts[1], "only_b": counts[2], "zero": 0, "n_latents": 64,
                               "bins": {"only_a": "< 0.1", "shared": "0.3..0.7", "only_b": "> 0.9"}}
        Image.new("RGB", (60, 40), "white").save(d / "relative_norms.png")
    (d / "metrics.json").write_text(json.dumps(m))
    save_file({"sparsity": torch.full((64,), -2.0)}, str(d / "sparsity.safetensors"))


def _labelled_points(monkeypatch) -> list[list[dict[str, Any]]]:
    """Patch Figure.savefig to record each saved figure (pareto.png first): per axes, its
    texts' display boxes (the point labels) and its frame."""
    import matplotlib.figure

    seen: list[list[dict[str, Any]]] = []
    orig = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        r = fig.canvas.get_renderer()
        seen.append([{"frame": ax.get_window_extent(r), "title": ax.get_title(),
                      "labels": {t.get_text(): t.get_window_extent(r) for t in ax.texts}}
                     for ax in fig.axes])
        return orig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


PAIR = ["base/blocks.0.hook_resid_post", "chat/blocks.0.hook_resid_post"]


def test_report_with_crosscoders(sweep: Path, monkeypatch):
    # L0 2 and FVU 0.1 would beat every SAE: a crosscoder is on its own hook set's frontier and
    # panel row, never on the SAEs'
    _crosscoder(sweep, "crosscoder-w64", PAIR, 2.0, [0.05, 0.15], (10, 20, 5))
    _crosscoder(sweep, "crosscoder-3hooks", ["a", "b", "c"], 3.0, [0.1, 0.2, 0.3], None)
    panels = _labelled_points(monkeypatch)
    files = write_report(sweep)
    rows = {r[0]: r for r in _rows(files.table)}
    head = rows["member"]
    col = head.index("FVU per hook")
    assert head[col - 4:] == ["L0", "FVU", "dead", "dense", "FVU per hook", "frontier"]
    assert rows["crosscoder-w64"][col] == "base 0.05, chat 0.15"
    assert rows["crosscoder-3hooks"][col] == "a 0.1, b 0.2, c 0.3"
    assert rows["topk-k4"][col] == "-"
    cc = rows["crosscoder-w64"]
    assert [cc[head.index(k)] for k in ("L0", "FVU", "dead", "frontier")] == ["2", "0.1", "0.125",
                                                                               "FVU"]
    assert rows["topk-k4"][-1] == "FVU" and rows["topk-k8"][-1] == "FVU"
    assert rows["relu-l1-1e-3"][-1] == ""
    text = files.report.read_text()
    assert "## Model diffing: relative decoder norms" in text
    assert "- only base (< 0.1): 10, shared (0.3..0.7): 20, only chat (> 0.9): 5 of 64 latents" in text
    assert "![relative decoder norms of crosscoder-w64](crosscoder-w64/relative_norms.png)" in text
    assert "crosscoder-3hooks/relative_norms" not in text  # three hooks: no diffing view
    assert "its own row of panels and frontier" in text
    # one row of panels per hook set: the SAEs' hook, then each crosscoder's (by folder name)
    saes, three, pair = panels[0]  # not evaluated: one panel per row
    assert sorted(saes["labels"]) == ["relu-l1-1e-3", "topk-k4", "topk-k8"]
    assert saes["title"].endswith("\nblocks.0.hook_resid_post")
    assert list(pair["labels"]) == ["crosscoder-w64"] and pair["title"].endswith(", ".join(PAIR))
    assert list(three["labels"]) == ["crosscoder-3hooks"] and three["title"].endswith("a, b, c")
    twelve = tuple(f"blocks.{i}.hook_mlp_out" for i in range(12))
    assert group_label((twelve, twelve)) == "blocks.{0..11}.hook_mlp_out"
    assert group_label((("blocks.0.x", "blocks.2.x"),) * 2) == "blocks.{0,2}.x"
    assert not any("not shown" in p["title"] for p in panels[0])
    # one run folder on its own: the image link is relative to that folder's report.md
    alone = write_report(sweep / "crosscoder-w64").report.read_text()
    assert "](relative_norms.png)" in alone


def test_report_of_crosscoders_only(tmp_path: Path, monkeypatch):
    _crosscoder(tmp_path / "s", "cc", PAIR, 2.0, [0.05, 0.15], (10, 20, 5))
    panels = _labelled_points(monkeypatch)
    files = write_report(tmp_path / "s")
    assert "base 0.05, chat 0.15" in files.table and files.pareto.exists()
    assert list(panels[0][0]["labels"]) == ["cc"]
    assert "not shown" not in panels[0][0]["title"]


def _dictionary(root: Path, name: str, arch: str, hooks: list[str], out_hooks: list[str],
                l0: float, fvus: list[float], eval_: dict | None = None) -> None:
    """A finished transcoder's or CLT's metrics.json as training writes it (per-hook FVU for
    several output hooks)."""
    d = root / name
    d.mkdir(parents=True)
    final = {"l0": l0, "fvu": sum(fvus) / len(fvus), "dead_fraction": 0.0,
             "dense_fraction": 0.0}
    if len(out_hooks) > 1:
        final.update({f"fvu/{h}": v for h, v in zip(out_hooks, fvus, strict=True)})
    m = {"name": name, "arch": arch, "sparsity": "topk", "hook": hooks[0] if len(hooks) == 1
         else None, "hooks": hooks, "out_hooks": out_hooks, "d_in": 8 * len(hooks), "d_sae": 32,
         "hyperparameters": {"width": 32, "lr": 1e-3, "k": 4, "sparsity": "topk"},
         "status": "done", "failure": None, "tokens": 4096, "steps": 16, "final": final,
         "d_out_per_hook": {h: 8 for h in out_hooks}}
    if eval_:
        m["eval"] = eval_
    (d / "metrics.json").write_text(json.dumps(m))


MLP_IN = ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized"]
MLP_OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]


def test_report_with_transcoders_clts_and_evaluated_crosscoders(sweep: Path, monkeypatch):
    """Every kind in one table; one panel row per (read -> predicted) hook set; the crosscoder's
    one-hook-at-a-time loss recovered and the CLT's per-hook FVU in their columns."""
    ev = {"l0": 4.0, "fvu": 0.3, "loss_recovered_zero": 0.8, "loss_recovered_mean": 0.7,
          "kl": 0.05, "ce_sae": 3.1, "ce_clean": 3.0, "n_tokens": 508,
          "tokens_source": "held-out sequences", "kind": "transcoder"}
    # a transcoder at L0 1 / FVU 0.01 would top the SAEs: it stays off their frontier
    _dictionary(sweep, "transcoder-k4", "transcoder", MLP_IN[:1], MLP_OUT[:1], 1.0, [0.01], ev)
    _dictionary(sweep, "transcoder-k8", "transcoder", MLP_IN[:1], MLP_OUT[:1], 8.0, [0.02],
                {**ev, "l0": 8.0, "loss_recovered_zero": 0.5})
    _dictionary(sweep, "clt-k4", "clt", MLP_IN, MLP_OUT, 8.0, [0.2, 0.4],
                {**ev, "kind": "clt", "l0": 8.0})
    per_hook = {MLP_OUT[0]: {"loss_recovered_zero": 0.9}, MLP_OUT[1]: {"loss_recovered_zero": 0.6}}
    _crosscoder(sweep, "cc-mlp", MLP_OUT, 2.0, [0.05, 0.15], None)
    p = sweep / "cc-mlp" / "metrics.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "arch": "crosscoder_topk",
                             "eval": {**ev, "kind": "crosscoder", "per_hook": per_hook}}))
    panels = _labelled_points(monkeypatch)
    files = write_report(sweep)
    rows = {r[0]: r for r in _rows(files.table)}
    head = rows["member"]
    assert [rows[n][1] for n in ("topk-k4", "transcoder-k4", "clt-k4", "cc-mlp")] == [
        "topk", "transcoder", "clt", "crosscoder_topk"]
    fvu_col, rec_col = head.index("FVU per hook"), head.index("loss rec. (zero) per hook")
    assert rows["clt-k4"][fvu_col] == f"{MLP_OUT[0]} 0.2, {MLP_OUT[1]} 0.4"
    assert rows["transcoder-k4"][fvu_col] == "-" and rows["topk-k4"][fvu_col] == "-"
    assert rows["cc-mlp"][rec_col] == f"{MLP_OUT[0]} 0.9, {MLP_OUT[1]} 0.6"
    assert rows["clt-k4"][rec_col] == "-"
    assert rows["transcoder-k4"][head.index("loss rec. (zero)")] == "0.8"
    # frontiers per group: transcoder-k8 (L0 8, FVU .02) loses to transcoder-k4 on both axes;
    # the SAEs keep theirs (topk-k4, topk-k8), untouched by the better transcoder
    assert rows["transcoder-k4"][-1] == "FVU, loss" and rows["transcoder-k8"][-1] == ""
    assert rows["topk-k4"][-1] == "FVU" and rows["topk-k8"][-1] == "FVU"
    assert rows["clt-k4"][-1] == "FVU, loss" and rows["cc-mlp"][-1] == "FVU, loss"
    # rows in sweep order, then the other folders by name: the SAEs' hook, the crosscoder's
    # hooks, the CLT's and the transcoders' in -> out hooks
    titles = [ax["title"].split("\n")[-1] for ax in panels[0][::2]]  # two panels per row
    assert titles == ["blocks.0.hook_resid_post", "blocks.{0,1}.hook_mlp_out",
                      "blocks.{0,1}.ln2.hook_normalized -> blocks.{0,1}.hook_mlp_out",
                      f"{MLP_IN[0]} -> {MLP_OUT[0]}"]
    fvu_panels = [sorted(ax["labels"]) for ax in panels[0][::2]]
    assert fvu_panels == [["relu-l1-1e-3", "topk-k4", "topk-k8"], ["cc-mlp"], ["clt-k4"],
                          ["transcoder-k4", "transcoder-k8"]]
    assert sorted(panels[0][7]["labels"]) == ["transcoder-k4", "transcoder-k8"]  # loss recovered
    text = files.report.read_text()
    assert "a transcoder replaces its output hook by its prediction from its input hook" in text
    assert "a CLT replaces every output hook in one pass" in text
    assert "each hook alone (`loss rec. (zero) per hook`)" in text


def test_pareto_labels_of_close_points_do_not_overlap(tmp_path: Path, monkeypatch):
    # the points of docs/pareto.png, where topk-k64's and relu-l11's labels collided, plus two
    # more crowding topk-k64
    points = {"topk-w2304-k16-lr5.33e-4": (17, .485), "topk-w2304-k32-lr5.33e-4": (31, .39),
              "topk-w2304-k64-lr5.33e-4": (63, .298), "relu-w2304-l11-lr2.5e-4-rs": (220, .298),
              "relu-w2304-l12-lr2.5e-4-rs": (110, .6), "relu-w2304-l10.5-lr2.5e-4-rs": (320, .188),
              "topk-w2304-k60-lr5.33e-4": (60, .30), "topk-w2304-k66-lr5.33e-4": (66, .296)}
    for i, (name, (l0, fvu)) in enumerate(points.items()):
        _member(tmp_path / "s", name, name.split("-")[0], {}, l0, fvu, seed=i)
    panels = _labelled_points(monkeypatch)
    write_report(tmp_path / "s")
    (panel,) = panels[0]
    boxes = panel["labels"]
    assert sorted(boxes) == sorted(points)
    names = list(boxes)
    for i, a in enumerate(names):
        f = panel["frame"]
        assert f.x0 <= boxes[a].x0 and boxes[a].x1 <= f.x1, a
        for b in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)


def test_multi_hook_sweep_has_one_frontier_and_one_row_of_panels_per_hook(sweep: Path,
                                                                          monkeypatch):
    # a layer-1 SAE worse than every layer-0 one is still on its own hook's frontier
    hook1 = "blocks.1.hook_resid_post"
    _member(sweep, "L1--topk-k8", "topk", {"k": 8}, 20.0, 0.5, hook=hook1)
    _member(sweep, "L1--topk-k16", "topk", {"k": 16}, 30.0, 0.6, hook=hook1)  # beaten by k8
    for name, l0, rec in (("topk-k8", 9.0, 0.95), ("L1--topk-k8", 21.0, 0.5)):
        _add_eval(sweep, name, l0, rec)
    panels = _labelled_points(monkeypatch)
    files = write_report(sweep)
    rows = {r[0]: r for r in _rows(files.table)}
    assert rows["L1--topk-k8"][-1] == "FVU, loss" and rows["L1--topk-k16"][-1] == ""
    assert rows["topk-k8"][-1] == "FVU, loss" and rows["relu-l1-1e-3"][-1] == ""
    fvu0, loss0, fvu1, loss1 = panels[0]  # rows: hook 0 (first in the sweep), then hook 1
    assert sorted(fvu0["labels"]) == ["relu-l1-1e-3", "topk-k4", "topk-k8"]
    assert sorted(fvu1["labels"]) == ["L1--topk-k16", "L1--topk-k8"]
    assert list(loss0["labels"]) == ["topk-k8"] and list(loss1["labels"]) == ["L1--topk-k8"]
    assert fvu1["title"].endswith(hook1) and loss0["title"].endswith("blocks.0.hook_resid_post")
