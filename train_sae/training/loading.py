"""Load any saved dictionary from its run folder, whatever its format: SAEs and transcoders
(SAELens folders, train_sae/training/saving.py), crosscoders (crosscoder_saving.py) and CLTs
(clt_saving.py). The model comes back in eval mode, on raw activations, with its hooks named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from train_sae.dictionaries import Dictionary
from train_sae.training.clt_saving import FORMAT as CLT_FORMAT
from train_sae.training.clt_saving import load_clt
from train_sae.training.crosscoder_saving import load_crosscoder
from train_sae.training.saving import CFG_FILENAME, load_sae


def saved_format(folder: Path) -> str:
    """"crosscoder", "clt" or "saelens" (an SAE or transcoder folder, or an unreadable one:
    `load_sae` names what is wrong with it)."""
    try:
        doc = json.loads((folder / CFG_FILENAME).read_text())
    except (OSError, ValueError):
        return "saelens"
    fmt = doc.get("format") if isinstance(doc, dict) else None
    return fmt if fmt in ("crosscoder", CLT_FORMAT) else "saelens"


def load_dictionary(folder: str | Path) -> tuple[Dictionary, dict[str, Any]]:
    """(the dictionary in eval mode, its cfg.json) from a run folder of any format."""
    path = Path(folder)
    fmt = saved_format(path)
    if fmt == "crosscoder":
        model, cfg = load_crosscoder(path)
        return model.eval(), cfg
    if fmt == CLT_FORMAT:
        return load_clt(path)
    return load_sae(path)
