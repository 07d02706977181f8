"""Which dictionaries a feature browser shows, and which store hooks each one reads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import fail
from train_sae.dictionaries import Dictionary
from train_sae.evaluation.report import member_folders
from train_sae.training.loading import load_dictionary
from train_sae.training.outputs import METRICS_JSON, read_json
from train_sae.training.saving import OUR_SECTION

# output hooks in the residual stream's basis, whose directions the unembedding reads (the
# decoder direction of a latent writing there, through W_U, is its direct effect on the logits):
# HookedTransformer's names and TransformerBridge's (blocks.L.hook_in/hook_out, attn/mlp.hook_out)
RESIDUAL_HOOK = re.compile(r"(hook_resid_(pre|mid|post)|hook_mlp_out|hook_attn_out"
                           r"|blocks\.\d+\.hook_(in|out)|\.(attn|mlp)\.hook_out)$")


@dataclass
class FeatureMember:
    name: str
    folder: Path
    model: Dictionary  # in eval mode, on raw activations
    arch: str
    store_inputs: list[str]  # the store hooks it reads, in its input order
    out_hook: str | None  # its one output hook by the model's name (None: several)

    @property
    def d_sae(self) -> int:
        return self.model.d_sae

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """{store hook: [rows, d_h]} -> latents [rows, d_sae] (dense)."""
        x = torch.cat([batch[h] for h in self.store_inputs], dim=1)
        return self.model.encode(x)

    @property
    def writes_residual(self) -> bool:
        return self.out_hook is not None and RESIDUAL_HOOK.search(self.out_hook) is not None


def select_members(path: Path, names: list[str]) -> list[FeatureMember]:
    """The finished members under `path` (a sweep folder or one run folder), or those named
    (each must exist and be finished), loaded on the CPU."""
    folders = member_folders(path)
    done = {f.name: f for f in folders
            if read_json(f / METRICS_JSON, "member metrics").get("status") == "done"}
    if names:
        unknown = [n for n in names if n not in {f.name for f in folders}]
        if unknown:
            fail(f"no member {', '.join(unknown)} under {path}; its members are "
                 f"{', '.join(f.name for f in folders)}")
        failed = [n for n in names if n not in done]
        if failed:
            fail(f"member {', '.join(failed)} under {path} did not finish training; choose "
                 f"finished ones ({', '.join(done) or 'none'})")
        chosen = [done[n] for n in names]
    else:
        chosen = list(done.values())
    if not chosen:
        fail(f"no finished member under {path} to show; train one with `train-sae sweep`")
    return [load_member(folder) for folder in chosen]


def load_member(folder: Path) -> FeatureMember:
    """A saved dictionary and the store hooks it reads: an SAE or transcoder names the model's
    hook (with the store's name in cfg.json when they differ), crosscoders and CLTs the store's."""
    model, cfg = load_dictionary(folder)
    ours = cfg.get(OUR_SECTION) if isinstance(cfg.get(OUR_SECTION), dict) else {}
    arch = str(ours.get("arch") or cfg.get("architecture") or cfg.get("arch") or model.io_kind)
    if model.io_kind in ("sae", "transcoder"):
        inputs = [str(ours.get("store_hook") or model.in_hooks[0])]
    else:
        inputs = list(model.in_hooks)
    outs = model.out_hooks
    out_hook = outs[0].partition("/")[2] or outs[0] if len(outs) == 1 else None
    return FeatureMember(folder.name, folder, model, arch, inputs, out_hook)
