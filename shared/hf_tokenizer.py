"""A Hugging Face checkpoint's own tokenizer, or None when it ships none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(folder: str, **kwargs: Any) -> Any:
    """The checkpoint's tokenizer (from its files, or from the GGUF file), or None if it has none."""
    from transformers import AutoTokenizer

    if "gguf_file" not in kwargs and not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from the model type alone
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tokenizer if len(tokenizer) > 0 else None
