"""Tiny random Hugging Face causal LMs (GPT-2, Llama, Qwen2 architectures) saved to folders with
the tiny word-level tokenizer (conftest.write_tiny_tokenizer: `tN` is token N), for the bridge
tests: no hub, a fraction of a second each."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_VOCAB, write_tiny_tokenizer

ARCHS = ("gpt2", "llama", "qwen2")


def tiny_config(arch: str):
    """A 2-layer, d_model 32 config of `arch` over the tiny tokenizer's vocabulary."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "gpt2":
        return GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2,  # grouped-query attention, as in SmolLM2 / Qwen2
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def save_tiny_hf(folder: Path, arch: str, seed: int = 0, tokenizer: bool = True):
    """Build the tiny `arch` model with weights from `seed`, save it (and the tokenizer) to
    `folder`; returns the model in eval mode, with eager attention as the bridge runs it."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    model.eval()
    model.save_pretrained(folder)
    if tokenizer:
        write_tiny_tokenizer(folder)
    return model
