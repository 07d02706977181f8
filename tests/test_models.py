"""shared/models.py: loading specs, hook listing and checking, and early-stopping capture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL_CONFIG, write_tiny_tokenizer

from shared.errors import UserError
from shared.models import (
    capture,
    check_context_size,
    check_hooks,
    deepest_stop,
    hook_dims,
    hook_names,
    load_model,
)


@pytest.fixture
def tiny(tiny_model_json: Path):
    return load_model(f"random:{tiny_model_json}")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- random models ---------------------------------------------------------------------------


def test_random_model_same_json_gives_bit_identical_weights(tmp_path: Path, tiny_model_json: Path):
    a = load_model(f"random:{tiny_model_json}")
    torch.manual_seed(1234)  # the global RNG must not matter
    torch.rand(100)
    b = load_model(f"random:{tiny_model_json}")
    pa, pb = _params(a.model), _params(b.model)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a.spec == b.spec and a.spec.startswith("random:") and len(a.spec) == len("random:") + 64

    # Same config written differently: same spec and weights. Another seed: other weights.
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(dict(reversed(list(TINY_MODEL_CONFIG.items()))), indent=2))
    c = load_model(f"random:{reordered}")
    assert c.spec == a.spec
    assert torch.equal(c.model.W_E, a.model.W_E)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY_MODEL_CONFIG, "seed": 1}))
    d = load_model(f"random:{other}")
    assert d.spec != a.spec and not torch.equal(d.model.W_E, a.model.W_E)


def test_random_model_leaves_caller_rng_alone(tiny_model_json: Path):
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    load_model(f"random:{tiny_model_json}")
    assert torch.equal(torch.rand(5), expected)


def test_random_model_info_and_eval_mode(tiny):
    assert tiny.info["n_layers"] == 3 and tiny.info["d_model"] == 16
    assert tiny.info["d_vocab"] == 64 and tiny.info["n_ctx"] == 32
    assert tiny.info["tokenizer"] is None and tiny.tokenizer is None
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    json.dumps(tiny.info)  # recorded in manifests


def test_random_model_with_local_tokenizer(tiny_model_json_with_tokenizer: Path):
    lm = load_model(f"random:{tiny_model_json_with_tokenizer}")
    assert lm.tokenizer is not None
    assert lm.tokenizer("t5 t6", add_special_tokens=False)["input_ids"] == [5, 6]
    assert lm.info["bos_token_id"] == 1 and lm.info["eos_token_id"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({k: v for k, v in TINY_MODEL_CONFIG.items() if k != "seed"}), '"seed"'),
        (json.dumps({**TINY_MODEL_CONFIG, "n_layerz": 2}), "not a valid HookedTransformerConfig"),
    ],
)
def test_random_model_bad_config(tmp_path: Path, content, message):
    path = tmp_path / "cfg.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_model(f"random:{path}")


def test_dtype_and_device(tiny_model_json: Path):
    lm = load_model(f"random:{tiny_model_json}", dtype="bfloat16")
    assert lm.model.W_E.dtype == torch.bfloat16 and lm.info["dtype"] == "bfloat16"
    out = capture(lm.model, torch.tensor([[1, 2, 3]]), ["blocks.0.hook_resid_post"])
    assert out["blocks.0.hook_resid_post"].dtype == torch.bfloat16
    f32 = load_model(f"random:{tiny_model_json}")
    assert torch.equal(lm.model.W_E, f32.model.W_E.to(torch.bfloat16))
    with pytest.raises(UserError, match="unknown dtype 'float64'"):
        load_model(f"random:{tiny_model_json}", dtype="float64")
    with pytest.raises(UserError, match="unknown device"):
        load_model(f"random:{tiny_model_json}", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            load_model(f"random:{tiny_model_json}", device="cuda")


# ---- other spec forms --------------------------------------------------------------------------


def test_unknown_model_name_suggests_official_names():
    with pytest.raises(UserError, match=r"unknown model 'gpt2-smal'.*did you mean gpt2\b"):
        load_model("gpt2-smal")


def test_hub_name_offline_is_one_clear_error():
    # conftest sets HF_HUB_OFFLINE=1: the official name resolves, the download cannot happen.
    with pytest.raises(UserError, match="cannot download NeelNanda/GELU_1L512W_C4_Code"):
        load_model("gelu-1l")


def test_missing_and_unusable_paths(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserError, match="has no config.json"):
        load_model(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(UserError, match="neither a .gguf file nor"):
        load_model(str(other))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(UserError, match="cannot load the GGUF model"):
        load_model(str(broken))


def _save_tiny_llama(folder: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder)
    write_tiny_tokenizer(folder)
    return hf


def test_local_hf_checkpoint_matches_transformers(tmp_path: Path):
    folder = tmp_path / "my-llama-tiny"  # "llama" in the path must not confuse the conversion
    hf = _save_tiny_llama(folder)
    lm = load_model(str(folder))
    assert lm.spec == "hf:my-llama-tiny"
    assert lm.info["architecture"] == "LlamaForCausalLM" and lm.info["n_layers"] == 2
    assert lm.tokenizer("t9 t10", add_special_tokens=False)["input_ids"] == [9, 10]
    tokens = torch.tensor([[1, 5, 9, 33, 17, 60, 2, 8]])
    with torch.no_grad():
        ours = torch.log_softmax(lm.model(tokens), -1)
        theirs = torch.log_softmax(hf(tokens).logits, -1)
    # center_unembed shifts logits per position, so compare log-probabilities.
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # GQA: hook_k has n_key_value_heads * d_head = 2 * 8 features, hook_z n_heads * d_head.
    dims = hook_dims(lm.model, ["blocks.1.attn.hook_k", "blocks.1.attn.hook_z"])
    assert dims == {"blocks.1.attn.hook_k": 16, "blocks.1.attn.hook_z": 32}


# ---- hooks and capture --------------------------------------------------------------------------


def test_hook_names_are_in_forward_order(tiny):
    tokens = torch.tensor([[4, 5, 6, 7]])
    _, cache = tiny.model.run_with_cache(tokens)
    assert hook_names(tiny.model) == list(cache.keys())
    names = hook_names(tiny.model)
    assert names[0] == "hook_embed" and names[-1] == "unembed.hook_out"
    assert names.index("blocks.0.attn.hook_z") < names.index("blocks.0.hook_resid_post")
    assert names.index("blocks.0.hook_resid_post") < names.index("blocks.1.hook_resid_pre")


def test_check_hooks_lists_nearby_names(tiny):
    with pytest.raises(UserError) as err:
        check_hooks(tiny.model, ["blocks.1.hook_resid_pots"])
    msg = str(err.value)
    assert "unknown hook 'blocks.1.hook_resid_pots'" in msg
    assert "closest: blocks.1.hook_resid_post" in msg and "\n" not in msg
    with pytest.raises(UserError, match="attention patterns"):
        check_hooks(tiny.model, ["blocks.0.attn.hook_pattern"])
    with pytest.raises(UserError, match="more than once"):
        check_hooks(tiny.model, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_post"])
    with pytest.raises(UserError, match="no hook given"):
        check_hooks(tiny.model, [])
    check_hooks(tiny.model, ["blocks.2.hook_resid_post", "hook_embed"])


def test_hook_dims_flatten_heads(tmp_path: Path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({**TINY_MODEL_CONFIG, "n_heads": 2, "d_head": 6, "d_mlp": 40}))
    model = load_model(f"random:{path}").model
    dims = hook_dims(
        model,
        ["blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post", "blocks.2.attn.hook_z", "blocks.0.hook_attn_out"],
    )
    assert dims == {
        "blocks.0.hook_resid_pre": 16,
        "blocks.1.mlp.hook_post": 40,
        "blocks.2.attn.hook_z": 12,
        "blocks.0.hook_attn_out": 16,
    }
    with pytest.raises(UserError, match="unknown hook"):
        hook_dims(model, ["blocks.3.hook_resid_pre"])


def test_capture_equals_run_with_cache(tiny):
    hooks = ["blocks.1.attn.hook_z", "hook_embed", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
    tokens = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    out = capture(tiny.model, tokens, hooks)
    _, cache = tiny.model.run_with_cache(tokens)
    assert list(out) != [] and set(out) == set(hooks)
    for hook in hooks:
        expected = cache[hook].reshape(3, 10, -1)  # hook_z: [3, 10, 4, 4] -> [3, 10, 16]
        assert out[hook].shape == (3, 10, 16)
        assert torch.equal(out[hook], expected), hook


def test_capture_stops_after_the_deepest_hook(tiny):
    model = tiny.model
    hook_names(model)  # the one-off probe pass that lists the hooks runs the whole model
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
        for name, module in [
            ("block1", model.blocks[1]),
            ("block1.mlp", model.blocks[1].mlp),
            ("block2", model.blocks[2]),
            ("ln_final", model.ln_final),
            ("unembed", model.unembed),
        ]
    ]
    try:
        tokens = torch.tensor([[4, 5, 6]])
        hooks = ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
        assert deepest_stop(model, hooks) == 2
        capture(model, tokens, hooks)
        assert calls == ["block1"]  # block 1's MLP, block 2, the final norm and unembed never ran
        calls.clear()
        capture(model, tokens, ["ln_final.hook_normalized"])
        assert calls == ["block1", "block1.mlp", "block2", "ln_final"]  # still no unembed
        calls.clear()
        model(tokens)  # sanity: the counters do see a full pass
        assert calls[-1] == "unembed"
    finally:
        for h in handles:
            h.remove()
    assert deepest_stop(model, ["hook_embed", "hook_pos_embed"]) == 0
    assert deepest_stop(model, ["blocks.2.hook_resid_post"]) == 3
    assert deepest_stop(model, ["ln_final.hook_normalized", "blocks.0.hook_resid_pre"]) is None


def test_capture_leaves_no_hooks_behind(tiny):
    capture(tiny.model, torch.tensor([[4, 5]]), ["blocks.0.hook_resid_post"])
    assert all(not hp.fwd_hooks for hp in tiny.model.hook_dict.values())


def test_check_context_size(tiny):
    check_context_size(tiny.model, 32)
    with pytest.raises(UserError, match=r"longer than the model's context \(32\)"):
        check_context_size(tiny.model, 33)
    with pytest.raises(UserError, match="at least 1"):
        check_context_size(tiny.model, 0)


def test_local_gpt2_checkpoint_saved_by_transformers5(tmp_path: Path):
    # transformers 5 no longer writes GPT-2's n_ctx, which transformer_lens' conversion reads.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    lm = load_model(str(tmp_path / "gpt2-tiny"))
    assert lm.spec == "hf:gpt2-tiny" and lm.info["n_ctx"] == 32 and lm.tokenizer is None
    tokens = torch.tensor([[1, 5, 9, 33, 17]])
    with torch.no_grad():
        ours = torch.log_softmax(lm.model(tokens), -1)
        theirs = torch.log_softmax(hf(tokens).logits, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
