"""`cache-acts run` with several models (model diffing): one store whose hooks are named per model,
each model's arrays equal to its own forward pass at the same rows, the shared-tokenizer check,
resume with the model list in the settings, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from conftest import TINY_VOCAB, as_text, invoke, tiny_docs

from cache_acts import run as run_module
from cache_acts.cli import main
from cache_acts.run import RunConfig, run_cache
from cache_acts.state import STATE_FILE, TMP_DIR
from shared.errors import UserError
from shared.models import capture, load_model
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches
from train_sae.training.loader import ActivationLoader

CTX = 16
RESID, MLP = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
BASE = dict(n_layers=2, d_model=32, d_mlp=64, n_heads=4, d_head=8, d_vocab=100, n_ctx=32,
            act_fn="gelu", normalization_type="LN", seed=0)
CHAT = {**BASE, "d_model": 24, "d_head": 6, "seed": 1}  # another width: d_in is per stored hook


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_diffing")
    for name, cfg in [("base", BASE), ("chat", CHAT), ("wide", {**BASE, "d_vocab": 120})]:
        (root / f"{name}.json").write_text(json.dumps(cfg))
    ids = np.random.default_rng(0).integers(0, 100, size=(40, CTX))
    pq.write_table(pa.table({"ids": ids.tolist()}), root / "tok.parquet")
    return root


def args(root: Path, out: str, *models: str) -> list[str]:
    return ["run", *[a for m in models for a in ("--model", m)], "--dataset",
            str(root / "tok.parquet"), "--token-column", "ids", "--context-size", str(CTX),
            "--no-bos", "--batch-size", "4", "--chunk-rows", "64", "--shuffle-memory", "16KiB",
            "--device", "cpu", "--out", str(root / out)]


def rnd(root: Path, name: str) -> str:
    return f"random:{root / name}.json"


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `cache-acts ARGS` in-process: (exit code, stdout, stderr)."""
    return invoke(main, "cache-acts", monkeypatch, capsys, *args)


def reference(root: Path, name: str, hooks: list[str]) -> dict[str, torch.Tensor]:
    """A model's own capture() over the source's token rows: {hook: [n_seq, ctx, d]}."""
    spec = TokenSpec(dataset=str(root / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    tokens = torch.cat([b.tokens for b in iter_token_batches(spec, None, 8)])
    return capture(load_model(rnd(root, name)).model, tokens, hooks) | {"tokens": tokens}


def test_two_models_match_their_own_forward_at_the_same_rows(monkeypatch, capsys, data):
    code, out, err = cli(monkeypatch, capsys, *args(data, "diff", f"base={rnd(data, 'base')}",
                                                    f"chat={rnd(data, 'chat')}"),
                         "--hook", RESID, "--hook", f"chat/{MLP}", "--tokens", "300", "--seed", "3")
    assert code == 0, err
    assert "cached 300 tokens x 3 hook(s)" in out
    stored = [f"base/{RESID}", f"chat/{RESID}", f"chat/{MLP}"]
    g = zarr.open_group(str(data / "diff"), mode="r")
    m = g.attrs["manifest"]
    assert m["complete"] and m["n_rows"] == 300 and m["hooks"] == stored
    assert m["d_in"] == {stored[0]: 32, stored[1]: 24, stored[2]: 24}
    specs = {t: load_model(rnd(data, t)).spec for t in ("base", "chat")}
    assert m["model"] == f"base={specs['base']},chat={specs['chat']}"
    assert m["model_info"]["models"] == specs
    assert m["model_info"]["per_model"]["chat"]["d_model"] == 24
    seq, pos = g["seq_index"][:], g["position"][:]
    assert np.array_equal(np.sort(seq.astype(np.int64) * CTX + pos), np.arange(300))
    refs = {"base": reference(data, "base", [RESID]), "chat": reference(data, "chat", [RESID, MLP])}
    assert np.array_equal(g["token_ids"][:], refs["base"]["tokens"][seq, pos].numpy())
    for name in stored:
        tag, hook = name.split("/", 1)
        x = g[f"acts/{name}"][:]
        assert x.shape == (300, m["d_in"][name])
        assert np.allclose(x, refs[tag][hook][seq, pos].numpy(), atol=1e-5), name
        assert np.allclose(m["stats"][name]["mean"], x.astype(np.float64).mean(0), atol=1e-9)
    # the trainer's loader reads the per-model hooks by name, memory-mapped, rows aligned
    store = open_store(data / "diff")
    assert store.memmappable()
    batch = ActivationLoader(store, [stored[2], stored[0]], 100, 1, normalize=False).batch(0)
    base_rows = g[f"acts/{stored[0]}"][:]
    rows = [int(np.flatnonzero((base_rows == r.numpy()).all(1))[0]) for r in batch[stored[0]]]
    assert np.array_equal(batch[stored[2]].numpy(), g[f"acts/{stored[2]}"][:][rows])
    assert cli(monkeypatch, capsys, "verify", str(data / "diff"))[0] == 0
    code, text, _ = cli(monkeypatch, capsys, "info", str(data / "diff"))
    assert code == 0 and "\nmodels\n" in text
    assert f"  base  {specs['base']}  (2 layers, d_model 32, d_vocab 100)" in text
    assert f"  chat/{MLP}  d_in 24" in text


def test_untagged_models_are_m0_m1_and_rows_stay_aligned(monkeypatch, capsys, data):
    """The same model twice: both stored arrays must be identical row for row."""
    code, _, err = cli(monkeypatch, capsys, *args(data, "twice", rnd(data, "base"),
                                                  rnd(data, "base")), "--hook", MLP,
                       "--dtype", "bfloat16")
    assert code == 0, err
    g = zarr.open_group(str(data / "twice"), mode="r")
    m = g.attrs["manifest"]
    assert m["hooks"] == [f"m0/{MLP}", f"m1/{MLP}"] and m["n_rows"] == 40 * CTX
    a, b = g[f"acts/m0/{MLP}"][:], g[f"acts/m1/{MLP}"][:]
    assert a.dtype == np.uint16 and np.array_equal(a, b) and a.any()
    assert m["stats"][f"m0/{MLP}"] == m["stats"][f"m1/{MLP}"]


def test_one_tagged_model_is_stored_under_its_tag(monkeypatch, capsys, data):
    code, _, err = cli(monkeypatch, capsys, *args(data, "tagged", f"chat={rnd(data, 'chat')}"),
                       "--hook", RESID, "--tokens", "64")
    assert code == 0, err
    m = zarr.open_group(str(data / "tagged"), mode="r").attrs["manifest"]
    assert m["hooks"] == [f"chat/{RESID}"] and m["model"].startswith("chat=random:")


@pytest.mark.parametrize(
    ("models", "hooks", "message"),
    [
        (["base", "wide"], [RESID], "models m0 (d_vocab 100) and m1 (d_vocab 120) have different "
                                    "vocabularies; model diffing needs models that share a tokenizer"),
        (["a=base", "b=chat"], [f"c/{RESID}"], "no --model is tagged 'c' (tags: a, b)"),
        (["a=base", "b=chat"], [f"a/{RESID}"], "model b has no hook; add --hook HOOK"),
        (["a=base", "a=chat"], [RESID], "model tag 'a' is used twice"),
        (["base"], [f"a/{RESID}"], "the one --model has no tag"),
        (["a=base", "b=chat"], [RESID, "b/blocks.5.hook_resid_post"],
         "model b: unknown hook 'blocks.5.hook_resid_post'"),
        (["a=base", "b=nothing"], [RESID], "model b: cannot read random-model config"),
    ],
)
def test_bad_model_lists_are_one_line(monkeypatch, capsys, data, models, hooks, message):
    specs = [f"{m.split('=')[0]}={rnd(data, m.split('=')[1])}" if "=" in m else rnd(data, m)
             for m in models]
    code, _, err = cli(monkeypatch, capsys, *args(data, "bad", *specs),
                       *[a for h in hooks for a in ("--hook", h)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not (data / "bad").exists()


def _tokenizer(folder: Path, shift: int) -> Path:
    """A word-level tokenizer of the tiny vocabulary size where `tN` has id 4 + (N - 4 + shift)
    mod (TINY_VOCAB - 4): shift 0 is conftest's tiny tokenizer, any other shift disagrees."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"t{i}": 4 + (i - 4 + shift) % (TINY_VOCAB - 4) for i in range(4, TINY_VOCAB)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Model configs of the tiny vocabulary: two with the same tokenizer, one with a shifted one,
    one without; and a jsonl file of text."""
    root = tmp_path_factory.mktemp("diffing_text")
    cfg = {**BASE, "d_vocab": TINY_VOCAB}
    toks = {"same": _tokenizer(root / "tok0", 0), "shifted": _tokenizer(root / "tok1", 1)}
    specs = {}
    for name, tok, seed in [("a", "same", 0), ("b", "same", 1), ("c", "shifted", 2), ("d", None, 3)]:
        extra = {"tokenizer_name": str(toks[tok])} if tok else {}
        (root / f"{name}.json").write_text(json.dumps({**cfg, **extra, "seed": seed}))
        specs[name] = f"random:{root / name}.json"
    with (root / "docs.jsonl").open("w") as f:
        for doc in tiny_docs(n_docs=20):
            f.write(json.dumps({"text": as_text(doc)}) + "\n")
    return root, specs


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("ab", None),
        ("ac", "models a and c tokenize the data differently"),
        ("ad", "model a has a tokenizer but d has none"),
    ],
)
def test_models_must_share_a_tokenizer(monkeypatch, capsys, text_models, pair, message):
    root, specs = text_models
    out = root / f"out-{pair}"
    code, _, err = cli(monkeypatch, capsys, "run", "--model", f"{pair[0]}={specs[pair[0]]}",
                       "--model", f"{pair[1]}={specs[pair[1]]}", "--dataset",
                       str(root / "docs.jsonl"), "--context-size", "8", "--hook", RESID,
                       "--device", "cpu", "--out", str(out))
    if message is None:
        assert code == 0, err
        g = zarr.open_group(str(out), mode="r")
        first = g["token_ids"][:][g["position"][:] == 0]  # the shared tokenizer's BOS
        assert len(first) == g.attrs["manifest"]["n_rows"] // 8 > 0 and set(first) == {1}
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_interrupted_run_resumes_to_the_same_store(monkeypatch, capsys, data, tmp_path):
    """Killed by an error after some commits, resumed: identical arrays; resuming with the
    model list changed is refused."""
    spec = TokenSpec(dataset=str(data / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    models = [f"base={rnd(data, 'base')}", f"chat={rnd(data, 'chat')}"]

    def config(out: Path, order: list[str]) -> RunConfig:
        return RunConfig(out=out, tokens=spec, model=order, hooks=[RESID, f"chat/{MLP}"],
                         batch_size=4, chunk_rows=64, shuffle_memory=16 << 10)

    run_cache(config(tmp_path / "ref", models))
    real, calls = run_module.capture, []

    def crash_on_call_9(model, tokens, hooks):
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("simulated crash")
        return real(model, tokens, hooks)

    monkeypatch.setattr(run_module, "capture", crash_on_call_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cache(config(tmp_path / "cut", models))
    monkeypatch.setattr(run_module, "capture", real)
    state = json.loads((tmp_path / "cut" / TMP_DIR / STATE_FILE).read_text())
    assert state["phase"] == "scatter" and 0 < state["rows_done"] < 40 * CTX
    with pytest.raises(UserError, match="different inputs: hooks .*; model "):
        run_cache(config(tmp_path / "cut", models[::-1]), resume=True)
    run_cache(config(tmp_path / "cut", models), resume=True)
    a, b = zarr.open_group(str(tmp_path / "ref"), mode="r"), zarr.open_group(
        str(tmp_path / "cut"), mode="r")
    names = [f"acts/base/{RESID}", f"acts/chat/{RESID}", f"acts/chat/{MLP}", "seq_index",
             "position", "token_ids"]
    for p in names:
        assert np.array_equal(a[p][:], b[p][:]), p
    assert a.attrs["manifest"]["checksums"] == b.attrs["manifest"]["checksums"]
    assert a.attrs["manifest"]["stats"] == b.attrs["manifest"]["stats"]
