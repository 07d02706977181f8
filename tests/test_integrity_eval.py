"""`train-sae eval` holds out by content (issue: integrity): the same data spelled another way, a
local file asked for another split, a moved store or a moved model are recognised; other data
starts at its beginning with a true provenance sentence; what cannot be told is refused; SAEs
trained on imported activations evaluate with --model."""

from __future__ import annotations

import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch
import typer

from cache_acts.importer import ImportConfig, import_files
from cache_acts.run import RunConfig, run_cache
from shared.errors import run_cli
from shared.models import capture, load_model
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches
from train_sae.cli import app as train_app

VOCAB, CTX, CACHED = 48, 8, 24
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalint")
    (root / "m.json").write_text(json.dumps({
        "n_layers": 1, "d_model": 16, "n_ctx": 32, "d_head": 4, "n_heads": 4, "d_mlp": 32,
        "d_vocab": VOCAB, "act_fn": "gelu", "normalization_type": "LN", "seed": 3}))
    rng = np.random.default_rng(0)
    with (root / "data.jsonl").open("w") as f:
        for _ in range(60):
            ids = rng.integers(1, VOCAB, int(rng.integers(5, 20))).tolist()
            f.write(json.dumps({"ids": ids, "ids2": ids}) + "\n")
    spec = TokenSpec(dataset=str(root / "data.jsonl"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    run_cache(RunConfig(out=root / "store", tokens=spec, model=f"random:{root / 'm.json'}",
                        hooks=[HOOK], max_tokens=CACHED * CTX, batch_size=8, chunk_rows=64))
    train(root / "store", root / "sweep")
    return root


def train(store, out) -> None:
    typer.main.get_command(train_app).main(
        ["sweep", "--store", str(store), "--out", str(out), "--arch", "topk", "--k", "4",
         "--width", "32", "--batch-size", "32", "--device", "cpu"], standalone_mode=False)


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        run_cli(partial(train_app, [str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def evaluate(capsys, sweep, *extra) -> dict:
    code, _, err = cli(capsys, "eval", sweep, "--n-tokens", 32, "--batch-size", 4,
                       "--device", "cpu", *extra)
    assert code == 0, err
    member = next(p for p in sweep.iterdir() if p.is_dir())
    return json.loads((member / "metrics.json").read_text())["eval"]


def n_cached(world) -> int:
    return int(open_store(world / "store").array("seq_index")[:].max()) + 1


def test_the_same_file_spelled_otherwise_or_with_a_split_is_held_out(world, capsys):
    default = evaluate(capsys, world / "sweep")
    assert default["start_sequence"] == n_cached(world) > 0
    spelled = world / ".." / world.name / "data.jsonl"  # another spelling of the same path
    assert evaluate(capsys, world / "sweep", "--dataset", spelled)["start_sequence"] == \
        n_cached(world)
    shutil.copy(world / "data.jsonl", world / "copy.jsonl")  # the same bytes elsewhere
    ev = evaluate(capsys, world / "sweep", "--dataset", world / "copy.jsonl", "--split", "test")
    assert ev["start_sequence"] == n_cached(world)
    assert ev["tokens_source"].startswith(f"held-out sequences from #{n_cached(world)}")


def test_other_data_starts_at_its_beginning_and_says_so(world, capsys):
    rng = np.random.default_rng(1)
    with (world / "other.jsonl").open("w") as f:
        for _ in range(20):
            f.write(json.dumps({"ids": rng.integers(1, VOCAB, 12).tolist()}) + "\n")
    ev = evaluate(capsys, world / "sweep", "--dataset", world / "other.jsonl")
    assert ev["start_sequence"] == 0 and "other data than the store was cached from" in \
        ev["tokens_source"]


def test_another_column_of_the_same_file_cannot_be_told(world, capsys):
    code, _, err = cli(capsys, "eval", world / "sweep", "--token-column", "ids2",
                       "--device", "cpu")
    assert code == 2 and "read through another column" in err and err.count("\n") == 1


def test_a_moved_store_needs_store_and_is_checked_by_content(world, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(world / "sweep", sweep)
    store = tmp_path / "moved_store"
    shutil.copytree(world / "store", store)
    doc = json.loads((sweep / "sweep.json").read_text())
    doc["store"] = str(tmp_path / "gone")
    (sweep / "sweep.json").write_text(json.dumps(doc))
    code, _, err = cli(capsys, "eval", sweep, "--model", f"random:{world / 'm.json'}",
                       "--dataset", world / "data.jsonl", "--token-column", "ids",
                       "--context-size", CTX, "--no-bos", "--device", "cpu")
    assert code == 2 and "pass --store with its new path" in err
    ev = evaluate(capsys, sweep, "--store", store, "--model", f"random:{world / 'm.json'}")
    assert ev["start_sequence"] == n_cached(world)
    # another store under the new path: refused by content
    other = tmp_path / "other_store"
    spec = TokenSpec(dataset=str(world / "data.jsonl"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    run_cache(RunConfig(out=other, tokens=spec, model=f"random:{world / 'm.json'}",
                        hooks=[HOOK], max_tokens=CACHED * CTX, batch_size=8, chunk_rows=64,
                        seed=1))
    code, _, err = cli(capsys, "eval", sweep, "--store", other, "--device", "cpu")
    assert code == 2 and "is not the one the sweep was trained on" in err


def test_a_moved_model_is_the_same_model_and_another_is_refused(world, capsys):
    shutil.copy(world / "m.json", world / "m_moved.json")
    ev = evaluate(capsys, world / "sweep", "--model", f"random:{world / 'm_moved.json'}")
    assert ev["model_check"] == "the model the store was cached from (same content)"
    cfg = json.loads((world / "m.json").read_text())
    (world / "m_other.json").write_text(json.dumps({**cfg, "seed": 4}))
    code, _, err = cli(capsys, "eval", world / "sweep", "--model",
                       f"random:{world / 'm_other.json'}", "--device", "cpu")
    assert code == 2 and "is not the one the sweep was trained on" in err


def test_an_sae_trained_on_imported_activations_evaluates_with_model(world, tmp_path, capsys):
    loaded = load_model(f"random:{world / 'm.json'}")
    spec = TokenSpec(dataset=str(world / "data.jsonl"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    tokens = torch.cat([b.tokens for b in iter_token_batches(spec, None, 8, max_sequences=30)])
    with torch.no_grad():
        acts = capture(loaded.model, tokens, [HOOK])[HOOK].reshape(-1, 16)
    np.save(tmp_path / "acts.npy", acts.numpy())
    import_files(ImportConfig(hooks={HOOK: [tmp_path / "acts.npy"]}, out=tmp_path / "st",
                              model="my-tiny-model", chunk_rows=64))
    train(tmp_path / "st", tmp_path / "sw")
    ev = evaluate(capsys, tmp_path / "sw", "--model", f"random:{world / 'm.json'}",
                  "--dataset", world / "data.jsonl", "--token-column", "ids",
                  "--context-size", CTX, "--no-bos")
    assert ev["model_check"].startswith("not checked: the store was imported")
    assert "whether its rows came from these tokens cannot be told" in ev["tokens_source"]
    assert ev["start_sequence"] == 0 and 0 < ev["fvu"] < 1


def test_the_cached_file_changed_in_place_cannot_be_told(world, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(world / "sweep", sweep)
    original = (world / "data.jsonl").read_text()
    try:
        with (world / "data.jsonl").open("a") as f:  # more lines: a superset of the cached data
            f.write(json.dumps({"ids": [5, 6, 7, 8, 9, 10], "ids2": [5]}) + "\n")
        code, _, err = cli(capsys, "eval", sweep, "--device", "cpu")
        assert code == 2 and "changed since the store was cached from it" in err
    finally:
        (world / "data.jsonl").write_text(original)
