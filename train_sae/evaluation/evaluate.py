"""Splice evaluation: how much of the language model's loss an SAE keeps when it replaces a hook.

For every batch of held-out tokens the model runs once clean, once per hook with the hook zeroed,
once per hook with the hook replaced by a mean vector, and once per SAE with the hook replaced by
the SAE's reconstruction. The clean and ablation passes are shared by every SAE at that hook, and
the blocks before a hook's layer run once per batch (the spliced passes start at that layer).

Definitions (positions t whose next token t+1 is a kept token; `keep` from the token source):
- ce_*: mean next-token cross-entropy (nats) of the clean / spliced / ablated model.
- loss_recovered_zero / _mean: (ce_ablated - ce_sae) / (ce_ablated - ce_clean), the "CE loss
  score" of seed 004 (zero ablation) and Conmy's "loss recovered" (seed 003), with a zero or mean
  ablation baseline.
- kl: mean over positions of KL(p_clean || p_sae) between next-token distributions.
- l0, fvu: latents per token and fraction of variance unexplained of the SAE on the hook's
  activations at the kept positions (FVU around the mean over all evaluated tokens).
Only kept positions are replaced (BOS/pad stay clean when the store dropped them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from shared.models import capture
from train_sae.dictionaries.base import SAE

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")


# --- metric formulas on tensors ----------------------------------------------------------------
def next_token_logprobs(logits: Tensor) -> Tensor:
    """logits [batch, ctx, vocab] -> log-probabilities [batch, ctx - 1, vocab] of the next token."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def next_token_ce(logp: Tensor, tokens: Tensor) -> Tensor:
    """logp [batch, ctx - 1, vocab], tokens [batch, ctx] -> per-position CE [batch, ctx - 1]."""
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_divergence(logp_ref: Tensor, logp: Tensor) -> Tensor:
    """KL(p_ref || p) per position: [batch, pos, vocab] x2 -> [batch, pos]."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(-1)


def loss_recovered(ce_model: float, ce_clean: float, ce_ablated: float) -> float:
    """Fraction of the ablation's loss increase the spliced model avoids (1 = as good as clean)."""
    # seed 004 "CE loss score" / seed 003 "loss recovered"
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_model) / gap if gap != 0 else math.nan


@dataclass
class ReconStats:
    """Streaming L0 and FVU over all evaluated tokens (float64 sums)."""

    n: int = 0
    l0_sum: float = 0.0
    resid_sum: float = 0.0  # sum ||x - x_hat||^2
    sq_sum: float = 0.0  # sum ||x||^2
    x_sum: Tensor | None = None  # [d_in]

    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        """x, x_hat [n, d_in], acts [n, d_sae]."""
        x64, xh64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.l0_sum += float((acts != 0).sum())
        self.resid_sum += float((x64 - xh64).pow(2).sum())
        self.sq_sum += float(x64.pow(2).sum())
        s = x64.sum(0)
        self.x_sum = s if self.x_sum is None else self.x_sum + s

    @property
    def l0(self) -> float:
        return self.l0_sum / max(self.n, 1)

    @property
    def fvu(self) -> float:
        """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (same formula as metrics.fvu)."""
        if self.x_sum is None:
            return math.nan
        total = self.sq_sum - float(self.x_sum.pow(2).sum()) / self.n
        return self.resid_sum / total if total > 0 else math.nan


@dataclass
class LossSums:
    """Running sums of per-position CE (and KL against the clean model)."""

    ce: float = 0.0
    kl: float = 0.0
    n: int = 0

    def add(self, ce: Tensor, mask: Tensor, kl: Tensor | None = None) -> None:
        self.ce += float(ce[mask].double().sum())
        if kl is not None:
            self.kl += float(kl[mask].double().sum())
        self.n += int(mask.sum())

    @property
    def mean_ce(self) -> float:
        return self.ce / self.n if self.n else math.nan

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n if self.n else math.nan


# --- splicing ----------------------------------------------------------------------------------
@dataclass
class SpliceTarget:
    """One SAE to evaluate: it takes and returns raw (unscaled) activations at `hook`."""

    name: str
    hook: str
    sae: SAE


@dataclass
class _Prefix:
    """What one batch's clean pass leaves for the spliced passes to start from."""

    tokens: Tensor  # [batch, ctx]
    keep: Tensor  # [batch, ctx] bool
    resid: dict[int, Tensor]  # start layer -> residual [batch, ctx, d_model] entering that layer
    shortformer: Tensor | None
    attention_mask: Tensor | None


def start_layer(hook: str, n_layers: int) -> int | None:
    """The block a pass may start at and still run `hook` (None: the whole model)."""
    m = _BLOCK_HOOK.match(hook)
    if m:
        return int(m.group(1))
    if hook.startswith("ln_final.") or hook.startswith("unembed."):
        return n_layers
    return None


def _clean_pass(model: HookedTransformer, tokens: Tensor, keep: Tensor,
                layers: list[int]) -> tuple[_Prefix, Tensor]:
    """Run the model once, keeping the residual entering each layer in `layers`; clean logits."""
    resid, _, shortformer, mask = model.input_to_embed(tokens)
    saved: dict[int, Tensor] = {}
    at = 0
    for layer in sorted(set(layers)):
        if layer > at:
            resid = model(resid, start_at_layer=at, stop_at_layer=layer,
                          shortformer_pos_embed=shortformer, attention_mask=mask)
            at = layer
        saved[layer] = resid
    logits = model(resid, start_at_layer=at, shortformer_pos_embed=shortformer,
                   attention_mask=mask, return_type="logits")
    return _Prefix(tokens, keep, saved, shortformer, mask), logits


def _spliced_logits(model: HookedTransformer, p: _Prefix, hook: str,
                    replace: Callable[[Tensor], Tensor]) -> Tensor:
    """Logits with `hook`'s activations at kept positions replaced by `replace(x [n, d_in])`."""

    def fn(act: Tensor, hook: object) -> Tensor:  # act [batch, ctx, *dims]
        flat = act.reshape(act.shape[0], act.shape[1], -1).clone()
        flat[p.keep] = replace(flat[p.keep]).to(flat.dtype)
        return flat.reshape(act.shape)

    layer = start_layer(hook, model.cfg.n_layers)
    with model.hooks(fwd_hooks=[(hook, fn)]):
        if layer is None:
            return model(p.tokens, attention_mask=p.attention_mask, return_type="logits")
        return model(p.resid[layer], start_at_layer=layer, shortformer_pos_embed=p.shortformer,
                     attention_mask=p.attention_mask, return_type="logits")


@dataclass
class _HookBaselines:
    zero: LossSums = field(default_factory=LossSums)
    mean: LossSums = field(default_factory=LossSums)


@torch.no_grad()
def splice_eval(model: HookedTransformer, targets: list[SpliceTarget],
                batches: Iterable[tuple[Tensor, Tensor]], means: dict[str, Tensor],
                progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate every target on `batches` of (tokens [b, ctx], keep [b, ctx]).

    `means[hook]` ([d_in]) is the mean-ablation vector of each hook. Returns, per target name,
    the metrics described in the module docstring plus `n_tokens` (scored positions).
    """
    device = next(model.parameters()).device
    hooks = sorted({t.hook for t in targets})
    layers = [start_layer(h, model.cfg.n_layers) for h in hooks]
    layers = [la for la in layers if la is not None]
    clean = LossSums()
    base = {h: _HookBaselines() for h in hooks}
    spliced = {t.name: LossSums() for t in targets}
    recon = {t.name: ReconStats() for t in targets}

    for tokens, keep in batches:
        tokens, keep = tokens.to(device), keep.to(device)
        prefix, logits = _clean_pass(model, tokens, keep, layers)
        logp_clean = next_token_logprobs(logits)
        del logits
        scored = keep[:, 1:]
        clean.add(next_token_ce(logp_clean, tokens), scored)
        for h in hooks:
            mean = means[h].to(device)
            for sums, repl in ((base[h].zero, torch.zeros_like),
                               (base[h].mean, lambda x, m=mean: m.expand_as(x))):
                logp = next_token_logprobs(_spliced_logits(model, prefix, h, repl))
                sums.add(next_token_ce(logp, tokens), scored)
        for t in targets:
            stats = recon[t.name]

            def through_sae(x: Tensor, sae: SAE = t.sae, stats: ReconStats = stats) -> Tensor:
                x = x.float()
                acts = sae.encode(x)
                x_hat = sae.decode(acts)
                stats.update(x, x_hat, acts)
                return x_hat

            logp = next_token_logprobs(_spliced_logits(model, prefix, t.hook, through_sae))
            spliced[t.name].add(next_token_ce(logp, tokens), scored,
                                kl_divergence(logp_clean, logp))
        if progress is not None:
            progress(int(scored.sum()))

    results: dict[str, dict[str, float]] = {}
    for t in targets:
        s, b = spliced[t.name], base[t.hook]
        results[t.name] = {
            "ce_clean": clean.mean_ce,
            "ce_sae": s.mean_ce,
            "ce_zero_ablation": b.zero.mean_ce,
            "ce_mean_ablation": b.mean.mean_ce,
            "loss_recovered_zero": loss_recovered(s.mean_ce, clean.mean_ce, b.zero.mean_ce),
            "loss_recovered_mean": loss_recovered(s.mean_ce, clean.mean_ce, b.mean.mean_ce),
            "kl": s.mean_kl,
            "l0": recon[t.name].l0,
            "fvu": recon[t.name].fvu,
            "n_tokens": clean.n,
        }
    return results


@torch.no_grad()
def hook_means(model: HookedTransformer, hooks: list[str],
               batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Mean activation [d_in] of each hook over the kept positions of `batches` (float64 sums)."""
    sums: dict[str, Tensor] = {}
    count = 0
    for tokens, keep in batches:
        for h, act in capture(model, tokens, hooks).items():  # act [batch, ctx, d_in]
            s = act[keep.to(act.device)].double().sum(0)
            sums[h] = s if h not in sums else sums[h] + s
        count += int(keep.sum())
    return {h: (s / max(count, 1)).float() for h, s in sums.items()}
