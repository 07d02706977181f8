"""Any Hugging Face causal LM through TransformerBridge (`--model hf:NAME_OR_PATH`): tiny random
GPT-2, Llama and Qwen2 checkpoints saved to folders, cached with `cache-acts run`, the stored
rows checked against the Hugging Face model's own `output_hidden_states`; capture stopping after
the deepest hook; `--list-hooks`; a hub name TransformerLens does not list, from a local hub
cache; bad input as one line with exit code 2. Runs on TransformerLens 3.9 and 4.x."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_VOCAB, as_text, invoke, tiny_docs
from hf_models import ARCHS, save_tiny_hf

from cache_acts.cli import main
from shared.errors import UserError
from shared.models import HOOKED_AVAILABLE, capture, hook_dims, list_hooks, load_model

CTX = 12
# blocks.0.hook_in is hidden_states[0] (GPT-2: token + position embedding), blocks.0's output
# (asked for by its HookedTransformer alias) hidden_states[1], and the final norm's output the
# last hidden state, which Hugging Face gives after the norm
HOOKS = {"blocks.0.hook_in": 0, "blocks.0.hook_resid_post": 1, "ln_final.hook_out": 2}


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return invoke(main, "cache-acts", monkeypatch, capsys, *args)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    for arch in ARCHS:
        save_tiny_hf(root / f"tiny-{arch}", arch, seed=ARCHS.index(arch))
    return {arch: root / f"tiny-{arch}" for arch in ARCHS}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Documents as text (words tN) and as ids (transformers 5 gives a qwen2 folder its own
    Qwen2Tokenizer class, which does not read the tiny vocabulary's words)."""
    path = tmp_path_factory.mktemp("bridge_text") / "docs.jsonl"
    with path.open("w") as f:
        for doc in tiny_docs(n_docs=30, seed=1):
            f.write(json.dumps({"text": as_text(doc), "ids": doc}) + "\n")
    return path


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_rows_equal_hf_hidden_states(monkeypatch, capsys, tmp_path, folders, text, arch):
    out = tmp_path / "store"
    hooks = [a for h in HOOKS for a in ("--hook", h)]
    source = ["--token-column", "ids"] if arch == "qwen2" else []
    code, printed, err = cli(monkeypatch, capsys, "run", "--model", f"hf:{folders[arch]}",
                             "--dataset", str(text), *source, "--context-size", str(CTX), *hooks,
                             "--batch-size", "4", "--chunk-rows", "32", "--device", "cpu",
                             "--out", str(out), "--tokens", "240")
    assert code == 0, err
    g = zarr.open_group(str(out), mode="r")
    m = g.attrs["manifest"]
    assert m["model"] == f"bridge:tiny-{arch}" and m["hooks"] == list(HOOKS)
    assert m["model_info"]["backend"] == "bridge" and m["d_in"] == dict.fromkeys(HOOKS, 32)
    assert m["model_info"]["source"] == {"kind": "bridge", "path": str(folders[arch].resolve()),
                                         "trust_remote_code": False}
    seq, pos, tok = g["seq_index"][:].astype(np.int64), g["position"][:], g["token_ids"][:]
    assert len(tok) == 240 and np.array_equal(np.sort(seq * CTX + pos), np.arange(240))
    tokens = np.zeros((20, CTX), dtype=np.int64)
    tokens[seq, pos] = tok  # the stream the rows came from: 20 sequences, each BOS first
    assert (tokens[:, 0] == 1).all()  # then words tN, documents joined by EOS (2)
    assert set(np.unique(tokens[:, 1:]).tolist()) <= {2, *range(4, TINY_VOCAB)}
    with torch.no_grad():
        states = hf_model(folders[arch])(torch.from_numpy(tokens), output_hidden_states=True)
    for hook, i in HOOKS.items():
        want = states.hidden_states[i][seq, pos].numpy()
        np.testing.assert_allclose(g[f"acts/{hook}"][:], want, atol=1e-5, rtol=1e-5)


def test_capture_stops_after_the_deepest_hook(folders):
    lm = load_model(f"hf:{folders['llama']}")
    hook_dims(lm.model, ["blocks.0.hook_out"])  # the one probe pass (whole) is done here
    ran: list[str] = []
    for name in ("blocks.1", "ln_final", "unembed"):
        lm.model.get_submodule(name).register_forward_pre_hook(lambda *_, n=name: ran.append(n))
    tokens = torch.randint(4, TINY_VOCAB, (2, CTX))
    acts = capture(lm.model, tokens, ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"])
    assert ran == []  # block 1, the final norm and the unembedding never ran
    assert acts["blocks.0.attn.hook_z"].shape == (2, CTX, 32)  # 4 heads x d_head 8, flattened
    with torch.no_grad():
        states = hf_model(folders["llama"])(tokens, output_hidden_states=True).hidden_states
        resid_mid = capture(lm.model, tokens, ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"]
    # the residual after block 0 is its input plus attention plus MLP outputs
    torch.testing.assert_close(resid_mid + acts["blocks.0.hook_mlp_out"], states[1])
    capture(lm.model, tokens, ["ln_final.hook_out"])
    assert ran == ["blocks.1", "ln_final"]  # only what the hook needs; still no unembedding
    # the raise that stopped each pass left no hook behind
    assert not any(hp.fwd_hooks for hp in lm.model.hook_dict.values())


def test_model_dtype_info_and_fingerprint(folders):
    lm = load_model(f"hf:{folders['qwen2']}", dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.spec == "bridge:tiny-qwen2" and lm.backend == "bridge"
    info = lm.info
    assert info["architecture"] == "Qwen2ForCausalLM" and info["dtype"] == "bfloat16"
    assert (info["n_layers"], info["d_model"], info["d_vocab"], info["n_ctx"]) == (2, 32, 64, 64)
    assert info["transformer_lens"].split(".")[0] in ("3", "4") and info["bos_token_id"] == 1
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    json.dumps(info)
    acts = capture(lm.model, torch.randint(4, TINY_VOCAB, (2, 5)), ["blocks.1.hook_out"])
    assert acts["blocks.1.hook_out"].dtype == torch.bfloat16
    if HOOKED_AVAILABLE:  # the same folder through HookedTransformer is another model
        hooked = load_model(str(folders["qwen2"]))
        assert hooked.backend == "hooked" and hooked.spec == "hf:tiny-qwen2"
        assert hooked.info["fingerprint"]["digest"] != info["fingerprint"]["digest"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_folder_without_tokenizer_caches_pre_tokenized_ids(monkeypatch, capsys, tmp_path, arch):
    folder = tmp_path / "no-tokenizer"
    hf = save_tiny_hf(folder, arch, tokenizer=False)
    data = tmp_path / "ids.jsonl"
    rows = [[(7 * i + j) % 60 + 4 for j in range(CTX)] for i in range(6)]
    data.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    code, _, err = cli(monkeypatch, capsys, "run", "--model", f"hf:{folder}", "--dataset",
                       str(data), "--token-column", "ids", "--no-bos", "--context-size",
                       str(CTX), "--hook", "blocks.1.hook_resid_pre", "--device", "cpu",
                       "--out", str(tmp_path / "store"))
    assert code == 0, err
    g = zarr.open_group(str(tmp_path / "store"), mode="r")
    assert g.attrs["manifest"]["model_info"]["tokenizer"] is None
    seq, pos = g["seq_index"][:].astype(np.int64), g["position"][:]
    with torch.no_grad():
        states = hf(torch.tensor(rows), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(g["acts/blocks.1.hook_resid_pre"][:], states[1][seq, pos].numpy(),
                               atol=1e-5, rtol=1e-5)


def test_list_hooks(monkeypatch, capsys, folders):
    code, printed, err = cli(monkeypatch, capsys, "run", "--list-hooks", "--model",
                             f"hf:{folders['gpt2']}", "--device", "cpu")
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0] == "# bridge:tiny-gpt2 (bridge): " + f"{len(lines) - 1} hook points"
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines[1:]}
    assert rows["blocks.0.hook_out"] == "32  = blocks.0.hook_resid_post"
    assert rows["blocks.1.attn.hook_pattern"] == "not per token"
    assert rows["blocks.0.attn.q.hook_out"] == "4x8  = blocks.0.attn.hook_q"
    assert rows["blocks.1.mlp.in.hook_out"] == "128  = blocks.1.mlp.hook_pre"  # GPT-2: 4 x 32
    # the listed order is the order the hooks fire, and every listed width is what is cached
    lm = load_model(f"hf:{folders['gpt2']}")
    listed = [h.name for h in list_hooks(lm.model)]
    assert listed == [line.split()[0] for line in lines[1:]]
    assert listed.index("blocks.0.hook_in") < listed.index("blocks.0.attn.hook_out") \
        < listed.index("blocks.0.hook_out") < listed.index("blocks.1.hook_in")
    widths = hook_dims(lm.model, ["blocks.0.attn.q.hook_out", "blocks.1.mlp.in.hook_out"])
    assert widths == {"blocks.0.attn.q.hook_out": 32, "blocks.1.mlp.in.hook_out": 128}


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder`'s files laid out as the Hugging Face hub cache keeps a downloaded repo."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_name_not_listed_by_transformer_lens_goes_through_the_bridge(
        monkeypatch, capsys, tmp_path, folders):
    """`--model org/name` that TransformerLens does not list loads through the bridge (from the
    hub cache here: offline), as `hf:org/name` does; rows equal the model's hidden states."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-llama", folders["llama"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    data = tmp_path / "ids.jsonl"
    rows = [[(5 * i + j) % 60 + 4 for j in range(CTX)] for i in range(4)]
    data.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    for spec, out in (("tiny-org/tiny-llama", "a"), ("hf:tiny-org/tiny-llama", "b")):
        code, _, err = cli(monkeypatch, capsys, "run", "--model", spec, "--dataset", str(data),
                           "--token-column", "ids", "--no-bos", "--context-size", str(CTX),
                           "--hook", "blocks.1.hook_out", "--device", "cpu",
                           "--out", str(tmp_path / out))
        assert code == 0, err
        m = zarr.open_group(str(tmp_path / out), mode="r").attrs["manifest"]
        assert m["model"] == "bridge:tiny-org/tiny-llama"
        assert m["model_info"]["source"]["name"] == "tiny-org/tiny-llama"
        assert m["fingerprints"]["model"]["revision"] == "0" * 40
    a, b = (zarr.open_group(str(tmp_path / o), mode="r") for o in "ab")
    np.testing.assert_array_equal(a["acts/blocks.1.hook_out"][:], b["acts/blocks.1.hook_out"][:])
    seq, pos = a["seq_index"][:].astype(np.int64), a["position"][:]
    tokens = np.zeros((int(seq.max()) + 1, CTX), dtype=np.int64)
    tokens[seq, pos] = a["token_ids"][:]  # the rows joined by EOS, cut into sequences
    with torch.no_grad():
        states = hf_model(folders["llama"])(torch.from_numpy(tokens), output_hidden_states=True)
    # blocks.1 is the last block: its output is before the final norm, not hidden_states[2]
    norm = hf_model(folders["llama"]).model.norm
    with torch.no_grad():
        np.testing.assert_allclose(norm(torch.from_numpy(a["acts/blocks.1.hook_out"][:])).numpy(),
                                   states.hidden_states[2][seq, pos].numpy(), atol=1e-5, rtol=1e-5)


# --- bad input: one line, exit code 2 -------------------------------------------------------------


def _save(folder: Path, config, model_class) -> Path:
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    return folder


def bad_folders(root: Path) -> dict[str, Path]:
    from transformers import BertConfig, BertForMaskedLM, CTRLConfig, CTRLLMHeadModel

    small = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1,
                 num_attention_heads=2, intermediate_size=32)
    empty = root / "empty"
    empty.mkdir()
    return {
        "masked": _save(root / "bert", BertConfig(**small), BertForMaskedLM),
        "ctrl": _save(root / "ctrl", CTRLConfig(vocab_size=TINY_VOCAB, n_embd=32, n_layer=1,
                                                n_head=2, dff=32, n_positions=64),
                      CTRLLMHeadModel),
        "empty": empty,
    }


@pytest.mark.parametrize("case, message", [
    ("masked", r"holds a BertForMaskedLM, not a causal language model"),
    ("ctrl", r"architecture CTRLLMHeadModel of model folder .* cannot be wrapped by "
             r"TransformerBridge \(TransformerLens [34]\."),
    ("empty", r"model folder .*empty has no config\.json"),
])
def test_bad_model_is_one_line_exit_2(monkeypatch, capsys, tmp_path, case, message):
    folder = bad_folders(tmp_path)[case]
    capsys.readouterr()  # (transformers' progress bars saving them)
    code, _, err = cli(monkeypatch, capsys, "run", "--model", f"hf:{folder}", "--hook",
                       "blocks.0.hook_out", "--device", "cpu", "--out", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_unknown_hook_lists_the_valid_ones(monkeypatch, capsys, tmp_path, folders):
    code, _, err = cli(monkeypatch, capsys, "run", "--model", f"hf:{folders['llama']}",
                       "--hook", "blocks.0.hook_resid_postt", "--device", "cpu",
                       "--out", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown hook 'blocks.0.hook_resid_postt'" in err
    assert "closest: blocks.0.hook_resid_post," in err
    # the valid names, block numbers folded; the full list with --list-hooks
    assert "blocks.N.hook_out" in err and "blocks.N.mlp.gate.hook_out" in err
    assert "ln_final.hook_out" in err and "--list-hooks" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "hf:", "--hook", "x"], "hf: needs a hub name or a checkpoint folder"),
    (["--model", "hf:./no/such/folder", "--hook", "x"], "model path ./no/such/folder does not exist"),
    (["--model", "hf:tiny-org/absent", "--hook", "x"], "cannot load hub model tiny-org/absent"),
    (["--trust-remote-code", "--hook", "x"], "--trust-remote-code is for Hugging Face models"),
])
def test_bad_model_spec_is_one_line_exit_2(monkeypatch, capsys, tmp_path, argv, message):
    code, _, err = cli(monkeypatch, capsys, "run", *argv, "--device", "cpu",
                       "--out", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_hf_file_and_hooks_that_are_not_vectors(monkeypatch, capsys, tmp_path, folders):
    code, _, err = cli(monkeypatch, capsys, "run", "--model",
                       f"hf:{folders['gpt2'] / 'config.json'}", "--hook", "x", "--out",
                       str(tmp_path / "s"))
    assert code == 2 and "is a file; pass a Hugging Face checkpoint folder" in err
    lm = load_model(f"hf:{folders['gpt2']}")
    for hooks, message in ((["embed.hook_in"], "embed.hook_in gives token ids"),
                           (["blocks.0.attn.hook_pattern"], "attention patterns"),
                           (["blocks.0.hook_in", "blocks.0.hook_resid_pre"],
                            "blocks.0.hook_in and blocks.0.hook_resid_pre are one hook point")):
        with pytest.raises(UserError, match=message):
            capture(lm.model, torch.ones(1, 2, dtype=torch.long), hooks)


@pytest.mark.skipif(HOOKED_AVAILABLE, reason="TransformerLens 3.x has HookedTransformer")
def test_random_spec_is_refused_without_hooked_transformer(tiny_model_json):
    with pytest.raises(UserError, match=r"random:CONFIG\.json builds a HookedTransformer"):
        load_model(f"random:{tiny_model_json}")


_CONFIG_CODE = """from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
_MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


def test_trust_remote_code(monkeypatch, capsys, tmp_path, folders):
    """A checkpoint whose config and model classes are Python files it ships (auto_map) loads
    only with --trust-remote-code; its rows are those of the model transformers builds from
    that code; the manifest records the flag, so eval reloads the model the same way."""
    from transformers import AutoModelForCausalLM

    from train_sae.evaluation.eval_sweep import EvalOptions, resolve_model

    folder = tmp_path / "custom"
    folder.mkdir()
    for f in folders["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "configuration_tiny.py").write_text(_CONFIG_CODE)
    (folder / "modeling_tiny.py").write_text(_MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "tiny-custom"
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "ids.jsonl"
    rows = [[(3 * i + j) % 60 + 4 for j in range(CTX)] for i in range(3)]
    data.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    args = ["run", "--model", f"hf:{folder}", "--dataset", str(data), "--token-column", "ids",
            "--no-bos", "--context-size", str(CTX), "--hook", "blocks.0.hook_out",
            "--device", "cpu", "--out", str(tmp_path / "store")]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # transformers would ask on a terminal
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "needs to run the Python code it ships" in err and "--trust-remote-code" in err
    code, _, err = cli(monkeypatch, capsys, *args, "--trust-remote-code")
    assert code == 0, err
    g = zarr.open_group(str(tmp_path / "store"), mode="r")
    manifest = g.attrs["manifest"]
    assert manifest["model_info"]["source"]["trust_remote_code"] is True
    hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                              attn_implementation="eager").eval()
    assert type(hf).__name__ == "TinyForCausalLM"
    seq, pos = g["seq_index"][:].astype(np.int64), g["position"][:]
    tokens = np.zeros((int(seq.max()) + 1, CTX), dtype=np.int64)
    tokens[seq, pos] = g["token_ids"][:]
    with torch.no_grad():
        states = hf(torch.from_numpy(tokens), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(g["acts/blocks.0.hook_out"][:], states[1][seq, pos].numpy(),
                               atol=1e-5, rtol=1e-5)
    from shared.store import open_store

    manifest = open_store(tmp_path / "store").manifest
    with pytest.raises(UserError, match="cached with --trust-remote-code .* pass "
                                        "--trust-remote-code to eval if you trust it"):
        resolve_model(EvalOptions(device="cpu"), manifest)  # not without the user saying so
    loaded = resolve_model(EvalOptions(device="cpu", trust_remote_code=True), manifest)
    assert loaded.spec == "bridge:custom" and type(loaded.model.original_model).__name__ == \
        "TinyForCausalLM"


def test_specs_without_hf_prefix_use_hooked_transformer_where_it_exists(folders):
    """A folder given without `hf:` is HookedTransformer's on TransformerLens 3.x (converted and
    weight-processed) and the bridge's on 4.x, which removed HookedTransformer; a name
    TransformerLens lists is fetched by HookedTransformer or the bridge alike (offline here)."""
    lm = load_model(str(folders["llama"]))
    if HOOKED_AVAILABLE:
        assert lm.backend == "hooked" and lm.spec == "hf:tiny-llama"
        with pytest.raises(UserError, match="cannot download NeelNanda/GELU_1L512W_C4_Code"):
            load_model("gelu-1l")
    else:
        assert lm.backend == "bridge" and lm.spec == "bridge:tiny-llama"
        with pytest.raises(UserError, match="cannot load hub model NeelNanda/GELU_1L512W_C4_Code"):
            load_model("gelu-1l")
    assert lm.info["n_layers"] == 2 and lm.info["architecture"] == "LlamaForCausalLM"
    with pytest.raises(UserError, match=r"unknown model 'no-such-model'.*hub name \(org/name"):
        load_model("no-such-model")
