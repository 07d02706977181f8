"""`train-sae eval` end to end: cache a tiny random model, train a sweep, evaluate, check numbers."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer

from cache_acts.run import RunConfig, run_cache
from shared.errors import UserError, run_cli
from shared.models import load_model
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches, source_fingerprint
from train_sae.cli import app as train_app
from train_sae.evaluation.eval_sweep import (
    EvalOptions,
    evaluate_path,
    held_out_start,
    training_data,
)
from train_sae.training.loading import load_dictionary
from train_sae.training.saving import load_sae

VOCAB = 48
CTX = 16
CACHED = 24  # sequences cached; the eval reads the ones after them
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]


def _model_json(path: Path, seed: int) -> Path:
    cfg = {"n_layers": 2, "d_model": 16, "n_ctx": 32, "d_head": 4, "n_heads": 4, "d_mlp": 32,
           "d_vocab": VOCAB, "act_fn": "gelu", "normalization_type": "LN", "seed": seed}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalcli")
    model = _model_json(root / "model.json", seed=5)
    g = torch.Generator().manual_seed(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for _ in range(40):
            n = int(torch.randint(5, 30, (1,), generator=g))
            f.write(json.dumps({"ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()}) + "\n")
    spec = TokenSpec(dataset=str(data), token_column="ids", context_size=CTX, prepend_bos=False)
    store = root / "store"
    run_cache(RunConfig(out=store, tokens=spec, model=f"random:{model}",
                        hooks=[HOOKS[1], HOOKS[0]], max_tokens=CACHED * CTX,
                        batch_size=8, chunk_rows=128))
    out = root / "sweep"
    typer_app = typer.main.get_command(train_app)
    typer_app.main(["sweep", "--store", str(store), "--out", str(out), "--arch", "topk,relu",
                    "--hook", HOOKS[1], "--k", "4", "--l1", "1e-3", "--width", "32",
                    "--batch-size", "64", "--device", "cpu", "--log-every", "2"],
                   standalone_mode=False)
    # both hooks: a topk SAE per hook and one crosscoder reading both
    mixed = root / "mixed"
    typer_app.main(["sweep", "--store", str(store), "--out", str(mixed), "--hook", "all",
                    "--arch", "topk,crosscoder_topk", "--k", "4", "--width", "32",
                    "--batch-size", "64", "--device", "cpu", "--log-every", "2"],
                   standalone_mode=False)
    return {"root": root, "model": model, "data": data, "store": store, "out": out,
            "mixed": mixed}


def _cli(*args: str) -> None:
    """`train-sae ARGS` in this process, through the real app and its error handling."""
    run_cli(partial(train_app, list(args)))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_eval_writes_metrics_matching_plain_transformer_lens(sweep, capsys):
    _cli("eval", str(sweep["out"]), "--model", f"random:{sweep['model']}", "--n-tokens", "160",
         "--batch-size", "4", "--device", "cpu")
    printed = capsys.readouterr().out
    store = open_store(sweep["store"])
    n_cached = int(store.array("seq_index")[:].max()) + 1
    members = sorted(p.parent for p in sweep["out"].glob("*/metrics.json"))
    assert len(members) == 2 and all(m.name in printed for m in members)
    loaded = load_model(f"random:{sweep['model']}")
    spec = TokenSpec(dataset=str(sweep["data"]), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    held = torch.cat([b.tokens for b in iter_token_batches(spec, None, 100, n_cached, 10)])
    assert held.shape == (10, CTX)  # 160 tokens = 10 sequences after the cached ones
    clean = F.cross_entropy(loaded.model(held)[:, :-1].reshape(-1, VOCAB), held[:, 1:].reshape(-1))
    mean = torch.tensor(store.manifest.stats["blocks.1.hook_resid_pre"].mean)
    for folder in members:
        ev = json.loads((folder / "metrics.json").read_text())["eval"]
        sae, _ = load_sae(folder)
        hook = "blocks.1.hook_resid_pre"
        logits = loaded.model.run_with_hooks(held, fwd_hooks=[(hook, lambda a, hook, s=sae: s(a))])
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), held[:, 1:].reshape(-1))
        mean_logits = loaded.model.run_with_hooks(
            held, fwd_hooks=[(hook, lambda a, hook: mean.expand_as(a))])
        ce_mean = F.cross_entropy(mean_logits[:, :-1].reshape(-1, VOCAB), held[:, 1:].reshape(-1))
        assert ev["start_sequence"] == n_cached and ev["n_sequences"] == 10
        assert ev["n_tokens"] == 10 * (CTX - 1)
        assert ev["ce_clean"] == pytest.approx(float(clean), abs=1e-5)
        assert ev["ce_sae"] == pytest.approx(float(ce), abs=1e-5)
        assert ev["ce_mean_ablation"] == pytest.approx(float(ce_mean), abs=1e-5)
        lr = (ev["ce_zero_ablation"] - ev["ce_sae"]) / (ev["ce_zero_ablation"] - ev["ce_clean"])
        assert ev["loss_recovered_zero"] == pytest.approx(lr)
        assert ev["model"] == loaded.spec and "after the" in ev["tokens_source"]
        if folder.name.startswith("topk"):
            assert ev["l0"] == pytest.approx(4.0)
        assert 0 < ev["fvu"] < 1.5 and ev["kl"] > 0
    # the report picks the eval up: second panel and eval columns
    _cli("report", str(sweep["out"]))
    text = (sweep["out"] / "report.md").read_text()
    assert "loss rec. (zero)" in text and "held-out sequences from #" in text


def test_eval_defaults_come_from_the_store(sweep):
    """No options: model and token stream from the manifest; mean over eval tokens differs."""
    res = evaluate_path(sweep["out"], EvalOptions(n_tokens=64, batch_size=4, progress=False,
                                                  mean_source="eval"))
    again = evaluate_path(sweep["out"], EvalOptions(n_tokens=64, batch_size=4, progress=False))
    for name, r in res.items():
        assert r["ce_clean"] == again[name]["ce_clean"] and r["ce_sae"] == again[name]["ce_sae"]
        assert r["ce_mean_ablation"] != again[name]["ce_mean_ablation"]
        assert r["mean_source"] == "mean over the evaluated tokens"
    # one run folder of the sweep on its own: same numbers for that member
    name = sorted(res)[0]
    one = evaluate_path(sweep["out"] / name, EvalOptions(n_tokens=64, batch_size=4, progress=False))
    assert list(one) == [name] and one[name]["ce_sae"] == again[name]["ce_sae"]


def test_eval_first_position_splices_and_scores_only_later_positions(sweep):
    first = 5
    res = evaluate_path(sweep["out"], EvalOptions(n_tokens=160, batch_size=4, progress=False,
                                                  first_position=first))
    n_cached = int(open_store(sweep["store"]).array("seq_index")[:].max()) + 1
    spec = TokenSpec(dataset=str(sweep["data"]), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    held = torch.cat([b.tokens for b in iter_token_batches(spec, None, 100, n_cached, 10)])
    model = load_model(f"random:{sweep['model']}").model
    hook = "blocks.1.hook_resid_pre"
    for name, r in res.items():
        sae, _ = load_sae(sweep["out"] / name)

        def splice_late(a, hook, sae=sae):
            a = a.clone()
            a[:, first:] = sae(a[:, first:])
            return a

        logits = model.run_with_hooks(held, fwd_hooks=[(hook, splice_late)])
        # scored: predictions of the positions that are kept (t + 1 >= first)
        ce = F.cross_entropy(logits[:, first - 1:-1].reshape(-1, VOCAB),
                             held[:, first:].reshape(-1))
        assert r["n_tokens"] == 10 * (CTX - first)
        assert r["ce_sae"] == pytest.approx(float(ce), abs=1e-5)


def test_eval_refuses_another_model(sweep, capsys):
    other = _model_json(sweep["root"] / "other.json", seed=6)
    with pytest.raises(SystemExit) as e:
        _cli("eval", str(sweep["out"]), "--model", f"random:{other}", "--device", "cpu")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one the sweep was trained on" in err[0]
    assert "pass the matching --model" in err[0]


def test_eval_errors(sweep, tmp_path):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"ids": [1, 2, 3]}) + "\n")
    with pytest.raises(UserError, match="no sequences of 16 tokens from #0"):
        evaluate_path(sweep["out"], EvalOptions(dataset=str(tiny), progress=False))
    with pytest.raises(UserError, match="context"):
        evaluate_path(sweep["out"], EvalOptions(context_size=64, progress=False))
    with pytest.raises(UserError, match="--n-tokens"):
        EvalOptions(n_tokens=0)
    with pytest.raises(UserError, match="--ablation-mean"):
        EvalOptions(mean_source="median")
    with pytest.raises(UserError, match="not a folder"):
        evaluate_path(tmp_path / "nope", EvalOptions())


def test_held_out_start_moves_past_cached_tokens(sweep):
    store = open_store(sweep["store"])
    trained = training_data({}, store)
    n_cached = int(store.array("seq_index")[:].max()) + 1
    same = TokenSpec(**store.manifest.dataset)
    assert held_out_start(same, source_fingerprint(same), trained)[0] == n_cached
    # twice the context: half as many sequences cover the cached tokens (rounded up)
    longer = TokenSpec(**{**store.manifest.dataset, "context_size": 2 * CTX})
    assert held_out_start(longer, source_fingerprint(longer), trained)[0] == -(-n_cached // 2)
    # BOS takes one slot: (CTX - 1) new tokens per sequence
    bos = TokenSpec(**{**store.manifest.dataset, "prepend_bos": True})
    assert held_out_start(bos, source_fingerprint(bos), trained)[0] == -(-n_cached * CTX // (CTX - 1))
    # a local file has no splits: --split test is the same data, still held out
    other_split = TokenSpec(**{**store.manifest.dataset, "split": "test"})
    assert held_out_start(other_split, source_fingerprint(other_split), trained)[0] == n_cached


def test_eval_splices_a_crosscoder_hook_by_hook_and_together(sweep, capsys):
    mixed = sweep["mixed"]
    cc = next(p for p in mixed.iterdir() if p.name.startswith("crosscoder_topk"))
    _cli("eval", str(mixed), "--n-tokens", "64", "--batch-size", "4", "--device", "cpu")
    captured = capsys.readouterr()
    assert not [ln for ln in captured.err.splitlines() if ln.startswith("note:")]
    assert "evaluated 2 SAE(s) and 1 crosscoder(s)" in captured.out
    assert f"  {cc.name} @ {HOOKS[0]}" in captured.out  # a table row per hook spliced alone
    saes = sorted(p for p in mixed.iterdir() if p.is_dir() and p != cc)
    assert [p.name.split("--")[0] for p in saes] == HOOKS
    for folder in saes:
        ev = json.loads((folder / "metrics.json").read_text())["eval"]
        assert ev["l0"] == pytest.approx(4.0) and 0 < ev["fvu"] < 1.5 and "per_hook" not in ev
        # the same numbers as evaluating that SAE's folder on its own
        alone = evaluate_path(folder, EvalOptions(n_tokens=64, batch_size=4, progress=False))
        assert alone[folder.name]["ce_sae"] == pytest.approx(ev["ce_sae"], abs=1e-6)
    # the crosscoder: its reconstruction from the clean activations of both hooks, spliced into
    # each hook alone and into both together, by hand with plain transformer_lens
    ev = json.loads((cc / "metrics.json").read_text())["eval"]
    assert ev["kind"] == "crosscoder" and ev["spliced_hooks"] == HOOKS[::-1]  # its hook order
    assert sorted(ev["per_hook"]) == sorted(HOOKS) and ev["l0"] == pytest.approx(4.0)
    store = open_store(sweep["store"])
    n_cached = int(store.array("seq_index")[:].max()) + 1
    spec = TokenSpec(dataset=str(sweep["data"]), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    held = torch.cat([b.tokens for b in iter_token_batches(spec, None, 100, n_cached, 4)])
    model = load_model(f"random:{sweep['model']}").model
    crosscoder, _ = load_dictionary(cc)
    _, cache = model.run_with_cache(held, names_filter=HOOKS)
    x = torch.cat([cache[h].reshape(-1, 16) for h in crosscoder.in_hooks], -1)
    blocks = crosscoder.split_outputs(crosscoder(x))

    def ce_with(hooks: list[str], value) -> float:
        logits = model.run_with_hooks(held, fwd_hooks=[(h, partial(value, h)) for h in hooks])
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), held[:, 1:].reshape(-1)))

    def spliced(h, a, hook):
        return blocks[h].reshape(a.shape)

    def zero(h, a, hook):
        return torch.zeros_like(a)

    assert ev["ce_sae"] == pytest.approx(ce_with(HOOKS, spliced), abs=1e-5)
    assert ev["ce_zero_ablation"] == pytest.approx(ce_with(HOOKS, zero), abs=1e-5)
    for h in HOOKS:
        one = ev["per_hook"][h]
        assert one["ce_sae"] == pytest.approx(ce_with([h], spliced), abs=1e-5)
        assert one["ce_zero_ablation"] == pytest.approx(ce_with([h], zero), abs=1e-5)
        lr = (one["ce_zero_ablation"] - one["ce_sae"]) / (one["ce_zero_ablation"] - one["ce_clean"])
        assert one["loss_recovered_zero"] == pytest.approx(lr)
        assert one["fvu"] == pytest.approx(ev[f"fvu/{h}"]) and 0 < one["fvu"] < 1.5
    # the report: eval columns for every member, per-hook FVU and loss recovered and the
    # two-hook view for the crosscoder
    _cli("report", str(mixed))
    capsys.readouterr()
    text = (mixed / "report.md").read_text()
    final = json.loads((cc / "metrics.json").read_text())["final"]
    row = next(ln for ln in text.splitlines() if ln.startswith(f"| {cc.name} |"))
    assert f"{HOOKS[1]} {final['fvu/' + HOOKS[1]]:.4g}, {HOOKS[0]} {final['fvu/' + HOOKS[0]]:.4g}" \
        in row
    rec = ev["per_hook"]
    assert (f"{HOOKS[1]} {rec[HOOKS[1]]['loss_recovered_zero']:.4g}, "
            f"{HOOKS[0]} {rec[HOOKS[0]]['loss_recovered_zero']:.4g}") in row
    assert f"![relative decoder norms of {cc.name}]({cc.name}/relative_norms.png)" in text
    assert (cc / "relative_norms.png").exists() and "loss rec. (zero)" in text


def test_eval_skips_crosscoders_over_several_models_with_a_note(sweep, tmp_path, capsys):
    """A model-diffing crosscoder (hooks of two models) cannot be spliced into one model."""
    mixed = tmp_path / "mixed"
    shutil.copytree(sweep["mixed"], mixed)
    cc = next(p for p in mixed.iterdir() if p.name.startswith("crosscoder_topk"))
    cfg = json.loads((cc / "cfg.json").read_text())
    (cc / "cfg.json").write_text(json.dumps({**cfg, "models": ["random:base", "random:chat"]}))
    cc_metrics = (cc / "metrics.json").read_bytes()
    _cli("eval", str(mixed), "--n-tokens", "64", "--batch-size", "4", "--device", "cpu")
    captured = capsys.readouterr()
    notes = [ln for ln in captured.err.splitlines() if ln.startswith("note:")]
    assert notes == [notes[0]] and "skipping 1 member(s) whose hooks come from several models" \
        in notes[0]
    assert cc.name in notes[0] and "random:chat" in notes[0]
    assert "cannot be spliced into one model" in notes[0] and cc.name not in captured.out
    assert (cc / "metrics.json").read_bytes() == cc_metrics, "the crosscoder is left untouched"
    assert "evaluated 2 SAE(s) on" in captured.out
    # only such crosscoders: one line, exit code 2, naming the crosscoder and where its numbers are
    with pytest.raises(SystemExit) as e:
        _cli("eval", str(cc), "--device", "cpu")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: nothing to evaluate")
    assert cc.name in err[0] and "train-sae report" in err[0]
