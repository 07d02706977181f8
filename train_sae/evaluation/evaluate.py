"""Splice evaluation: how much of the language model's loss a dictionary keeps when its predictions
replace the activations they predict.

For every batch of held-out tokens the model runs once clean, twice per set of replaced hooks with
those hooks zeroed / replaced by their mean vectors (the ablation baselines), and once per spliced
pass of each dictionary. The clean and ablation passes are shared by every dictionary replacing the
same hooks, and the blocks before a pass's first hook run once per batch (the other passes start
at that layer, from the clean pass's residual). A TransformerBridge model (any Hugging Face causal LM,
shared.bridge) runs every pass whole: its Hugging Face forward cannot start at a block.

What each kind of dictionary replaces (`io_kind`, train_sae/dictionaries/base.py):
- sae: its hook, by its reconstruction of that hook's activation (one spliced pass).
- transcoder (and skip_transcoder): its output hook (e.g. `blocks.L.hook_mlp_out`), by its
  prediction from its input hook (e.g. `blocks.L.ln2.hook_normalized`), read in the same spliced
  pass (the model computes it first, and nothing before it is changed, so it is the clean input).
- clt: every output hook at once in one spliced pass (the "replacement model"): at output hook t
  its prediction from the inputs read so far in that pass, those of layers > t set to zero (exact:
  layer t's outputs depend on inputs 0..t only). The splice is closed-loop: the input of layer
  t + 1 is read after layer t's output was replaced.
- crosscoder: open-loop: its reconstruction of all its hooks is computed from their CLEAN
  activations, then spliced in, each hook's block alone (one pass per hook, `per_hook`) and all
  blocks together (one pass, the main result).
The ablation baselines ablate the hooks the pass replaces: all of a CLT's output hooks together,
a crosscoder's hooks together (main result) or one at a time (`per_hook`).

Definitions (positions t whose next token t+1 is a kept token; `keep` from the token source):
- ce_*: mean next-token cross-entropy (nats) of the clean / spliced (`ce_sae`, whatever the
  dictionary's kind) / ablated model.
- loss_recovered_zero / _mean: (ce_ablated - ce_sae) / (ce_ablated - ce_clean), the "CE loss
  score" of seed 004 (zero ablation) and Conmy's "loss recovered" (seed 003), with a zero or mean
  ablation baseline.
- kl: mean over positions of KL(p_clean || p_spliced) between next-token distributions.
- l0, fvu: latents per token and fraction of variance unexplained of the dictionary's prediction
  against the clean activations of the hooks it predicts (its outputs concatenated), at the kept
  positions (FVU around the mean over all evaluated tokens), its inputs being the clean ones as
  in training; `fvu/<hook>` per output hook of a dictionary predicting several.
Only kept positions are replaced (BOS/pad stay clean when the store dropped them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from shared.errors import fail
from shared.models import capture, hook_positions, runs_from_layer
from train_sae.dictionaries.base import Dictionary
from train_sae.dictionaries.clt import CrossLayerTranscoder

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")

# how a dictionary of each kind is spliced: closed-loop kinds read their inputs in the spliced pass
OPEN_LOOP_KINDS = ("crosscoder",)


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


# --- what to splice ----------------------------------------------------------------------------
@dataclass
class SpliceTarget:
    """One dictionary to evaluate; it takes and returns raw (unscaled) activations.

    `in_hooks` / `out_hooks`: the MODEL's hooks its inputs / outputs are, in its order (its own
    hook names may be a store's); both default to [hook] (an SAE). `hook`: an SAE's hook; given
    `in_hooks`, it may be None (then their first)."""

    name: str
    hook: str | None
    sae: Dictionary | None
    in_hooks: list[str] = field(default_factory=list)
    out_hooks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.in_hooks = list(self.in_hooks) or [self.hook]  # type: ignore[list-item]
        self.out_hooks = list(self.out_hooks) or list(self.in_hooks)
        if self.hook is None:
            self.hook = self.in_hooks[0]

    @property
    def kind(self) -> str:
        """Its dictionary's io_kind: "sae", "transcoder", "clt" or "crosscoder"."""
        return getattr(self.sae, "io_kind", "sae")

    @property
    def open_loop(self) -> bool:
        return self.kind in OPEN_LOOP_KINDS

    def replacements(self) -> list[tuple[str, ...]]:
        """The hooks each of its spliced passes replaces: all its output hooks at once (the main
        result), then, for a crosscoder of several hooks, each hook alone."""
        together = tuple(self.out_hooks)
        if self.open_loop and len(together) > 1:
            return [together] + [(h,) for h in together]
        return [together]

    def pass_hooks(self, replaced: tuple[str, ...]) -> list[str]:
        """The hooks a spliced pass replacing `replaced` must run through (a closed-loop one
        reads the inputs too), so it starts at the earliest of their blocks."""
        return list(replaced) if self.open_loop else list(dict.fromkeys(self.in_hooks + self.out_hooks))

    def captured(self) -> list[str]:
        """Hooks whose clean activations it needs: an open-loop splice's inputs, and every hook of
        a dictionary whose FVU is measured from the clean pass (several outputs: a CLT)."""
        if self.open_loop or (self.kind == "clt"):
            return list(dict.fromkeys(self.in_hooks + self.out_hooks))
        return []


def start_layer(hook: str, n_layers: int) -> int | None:
    """The block a pass may start at and still run `hook` (None: the whole model)."""
    m = _BLOCK_HOOK.match(hook)
    if m:
        return int(m.group(1))
    if hook.startswith("ln_final.") or hook.startswith("unembed."):
        return n_layers
    return None


def pass_start(hooks: Iterable[str], n_layers: int) -> int | None:
    """The block a pass may start at and still run every hook of `hooks` (None: the whole
    model)."""
    layers = [start_layer(h, n_layers) for h in hooks]
    return None if not layers or any(la is None for la in layers) else min(layers)  # type: ignore


def splice_cost(target: SpliceTarget, n_layers: int) -> int:
    """Blocks (plus the unembedding) its spliced passes run: each from its first block."""
    return sum(n_layers + 1 - (pass_start(target.pass_hooks(r), n_layers) or 0)
               for r in target.replacements())


def check_splice_order(model: Any, targets: list[SpliceTarget]) -> None:
    """A closed-loop splice reads each input before the output predicted from it is replaced:
    refuse a dictionary whose input hook the model computes after that output hook."""
    order = hook_positions(model)  # a bridge's aliases included
    for t in targets:
        if t.open_loop:
            continue
        for j, out in enumerate(t.out_hooks):
            needed = t.in_hooks[:j + 1] if t.kind == "clt" else t.in_hooks
            late = [h for h in needed if h in order and out in order and order[h] > order[out]]
            if late:
                fail(f"{t.name} predicts {out} from {late[0]}, which the model computes after "
                     f"{out}, so its prediction cannot be spliced in while the model runs; "
                     "evaluate a dictionary whose input hooks come before its output hooks "
                     "(e.g. blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out)")


def _check_target(t: SpliceTarget) -> None:
    io = t.sae.io  # type: ignore[union-attr]
    if len(t.in_hooks) != len(io.inputs) or len(t.out_hooks) != len(io.outputs):
        fail(f"{t.name}: {len(t.in_hooks)} input and {len(t.out_hooks)} output hook(s) given for "
             f"a dictionary of {len(io.inputs)} and {len(io.outputs)}")


# --- splicing ----------------------------------------------------------------------------------
@dataclass
class _Prefix:
    """What one batch's clean pass leaves for the spliced passes to start from."""

    tokens: Tensor  # [batch, ctx]
    keep: Tensor  # [batch, ctx] bool
    resid: dict[int, Tensor]  # start layer -> residual [batch, ctx, d_model] entering that layer
    shortformer: Tensor | None
    attention_mask: Tensor | None


# a hook's replacement: its activations at the kept positions [n, d] (float32) -> what goes there
# instead [n, d], or None to leave them (a hook that is only read)
Replace = Callable[[Tensor], "Tensor | None"]


def _capture_hooks(keep: Tensor, hooks: list[str], into: dict[str, Tensor]) -> list:
    def saver(name: str) -> Callable:  # by the name asked for (a bridge hook may be an alias)
        def save(act: Tensor, hook: object) -> None:
            into[name] = act.reshape(act.shape[0], act.shape[1], -1)[keep].float()
        return save

    return [(h, saver(h)) for h in hooks]


def _clean_pass(model: Any, tokens: Tensor, keep: Tensor, layers: list[int],
                captured: list[str] | None = None) -> tuple[_Prefix, Tensor, dict[str, Tensor]]:
    """Run the model once, keeping the residual entering each layer in `layers` and the
    activations of `captured` at the kept positions ({hook: [n, d]} float32); clean logits.
    A model that cannot start a pass at a block (the bridge) keeps no residual: every spliced
    pass runs it whole."""
    acts: dict[str, Tensor] = {}
    if not runs_from_layer(model):
        with model.hooks(fwd_hooks=_capture_hooks(keep, list(captured or ()), acts)):
            logits = model(tokens, return_type="logits")
        return _Prefix(tokens, keep, {}, None, None), logits, acts
    with model.hooks(fwd_hooks=_capture_hooks(keep, list(captured or ()), acts)):
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
    return _Prefix(tokens, keep, saved, shortformer, mask), logits, acts


def _spliced_logits(model: Any, p: _Prefix, replace: dict[str, Replace]) -> Tensor:
    """Logits with each hook of `replace` given what its function returns at the kept positions.
    The pass starts at the first block any of the hooks is in (from the clean residual)."""

    def wrap(fn: Replace) -> Callable:
        def hook_fn(act: Tensor, hook: object) -> Tensor | None:  # act [batch, ctx, *dims]
            flat = act.reshape(act.shape[0], act.shape[1], -1)
            new = fn(flat[p.keep].float())
            if new is None:
                return None
            flat = flat.clone()
            flat[p.keep] = new.to(flat.dtype)
            return flat.reshape(act.shape)
        return hook_fn

    layer = pass_start(replace, model.cfg.n_layers) if runs_from_layer(model) else None
    with model.hooks(fwd_hooks=[(h, wrap(fn)) for h, fn in replace.items()]):
        if layer is None:
            return model(p.tokens, attention_mask=p.attention_mask, return_type="logits")
        return model(p.resid[layer], start_at_layer=layer, shortformer_pos_embed=p.shortformer,
                     attention_mask=p.attention_mask, return_type="logits")


def predict(sae: Dictionary, x: Tensor) -> tuple[Tensor, Tensor]:
    """(latents [n, d_sae], prediction [n, d_out]) of the dictionary on inputs x [n, d_in]."""
    acts = sae.encode(x)
    return acts, sae.decode(acts, x)


def _closed_loop(t: SpliceTarget, stats: ReconStats | None) -> dict[str, Replace]:
    """Hook functions of a closed-loop splice: each input hook's activation is read as the pass
    reaches it; at each output hook its prediction from the inputs read so far (a CLT's later
    layers as zeros) replaces it. `stats` (one output hook only) gets the prediction against the
    activation it replaces (an SAE's or transcoder's: the clean one)."""
    sae = t.sae
    assert sae is not None
    seen: dict[str, Tensor] = {}
    splits = sae.io.in_splits

    def at(hook: str) -> Replace:
        def fn(a: Tensor) -> Tensor | None:
            if hook in t.in_hooks:
                seen[hook] = a
            if hook not in t.out_hooks:
                return None
            j = t.out_hooks.index(hook)
            needed = t.in_hooks[:j + 1] if t.kind == "clt" else t.in_hooks
            missing = [h for h in needed if h not in seen]
            if missing:
                fail(f"{t.name} predicts {hook} from {missing[0]}, which the model has not "
                     f"computed yet when it reaches {hook}; evaluate a dictionary whose input "
                     "hooks come before its output hooks")
            x = torch.cat([seen[h] if h in seen else a.new_zeros(a.shape[0], d)
                           for h, d in zip(t.in_hooks, splits, strict=True)], dim=-1)
            latents, y = predict(sae, x)
            y_j = torch.split(y, sae.io.out_splits, dim=-1)[j]
            if stats is not None:
                stats.update(a, y_j, latents)
            return y_j
        return fn

    return {h: at(h) for h in dict.fromkeys(t.in_hooks + t.out_hooks)}


def _score(model: Any, p: _Prefix, logp_clean: Tensor | None, sums: LossSums,
           replace: dict[str, Replace]) -> None:
    """Add the CE (and, given the clean log-probabilities, the KL) of one spliced pass."""
    logp = next_token_logprobs(_spliced_logits(model, p, replace))
    sums.add(next_token_ce(logp, p.tokens), p.keep[:, 1:],
             None if logp_clean is None else kl_divergence(logp_clean, logp))


def _clt_closed_loop(t: SpliceTarget) -> dict[str, Replace]:
    """`_closed_loop` of a `CrossLayerTranscoder`, by its layers: each layer's latents are
    computed once, when its input is read (they depend on that input only), and output t is
    sum_{l <= t} acts_l @ W_dec[l, :, t] + b_dec[t]: one CLT forward per pass instead of one per
    output hook. The same numbers as the generic splice."""
    clt = t.sae
    assert isinstance(clt, CrossLayerTranscoder)
    L, n = clt.n_layers, clt.n_per_layer
    b_dec = clt.b_dec.view(L, -1)
    latents: dict[int, Tensor] = {}

    def at(hook: str) -> Replace:
        def fn(a: Tensor) -> Tensor | None:
            if hook in t.in_hooks:
                layer = t.in_hooks.index(hook)
                pre = a.new_zeros(a.shape[0], L, n)
                pre[:, layer] = a @ clt.W_enc[layer] + clt.b_enc.view(L, n)[layer]
                latents[layer] = clt.activation(pre.reshape(a.shape[0], -1)).view(
                    a.shape[0], L, n)[:, layer]  # the sparsity acts on each layer apart
            if hook not in t.out_hooks:
                return None
            out = t.out_hooks.index(hook)
            missing = [t.in_hooks[la] for la in range(out + 1) if la not in latents]
            if missing:
                fail(f"{t.name} predicts {hook} from {missing[0]}, which the model has not "
                     f"computed yet when it reaches {hook}; evaluate a dictionary whose input "
                     "hooks come before its output hooks")
            return b_dec[out] + sum(latents[la] @ clt.W_dec[la, :, out] for la in range(out + 1))
        return fn

    return {h: at(h) for h in dict.fromkeys(t.in_hooks + t.out_hooks)}


@dataclass
class _Baselines:
    zero: LossSums = field(default_factory=LossSums)
    mean: LossSums = field(default_factory=LossSums)


@torch.no_grad()
def splice_eval(model: Any, targets: list[SpliceTarget],
                batches: Iterable[tuple[Tensor, Tensor]], means: dict[str, Tensor],
                progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Evaluate every target on `batches` of (tokens [b, ctx], keep [b, ctx]).

    `means[hook]` ([d]) is the mean-ablation vector of each replaced hook. Returns, per target
    name, the metrics described in the module docstring plus `n_tokens` (scored positions),
    `kind` and `spliced_hooks`; a crosscoder of several hooks also `per_hook` (each hook spliced
    alone: its own CE, KL, loss recovered against that hook's ablation, and FVU).
    """
    device = next(model.parameters()).device
    n_layers = model.cfg.n_layers
    for t in targets:
        _check_target(t)
    check_splice_order(model, targets)
    ablated = list(dict.fromkeys(r for t in targets for r in t.replacements()))
    captured = list(dict.fromkeys(h for t in targets for h in t.captured()))
    starts = [pass_start(r, n_layers) for r in ablated]
    starts += [pass_start(t.pass_hooks(r), n_layers) for t in targets for r in t.replacements()]
    layers = [la for la in starts if la is not None]
    clean = LossSums()
    base = {r: _Baselines() for r in ablated}
    spliced = {(t.name, r): LossSums() for t in targets for r in t.replacements()}
    recon = {t.name: ReconStats() for t in targets}
    per_hook = {(t.name, h): ReconStats() for t in targets if len(t.out_hooks) > 1
                for h in t.out_hooks}

    for tokens, keep in batches:
        tokens, keep = tokens.to(device), keep.to(device)
        prefix, logits, acts = _clean_pass(model, tokens, keep, layers, captured)
        logp_clean = next_token_logprobs(logits)
        del logits
        scored = keep[:, 1:]
        clean.add(next_token_ce(logp_clean, tokens), scored)
        for r in ablated:
            _score(model, prefix, None, base[r].zero, {h: torch.zeros_like for h in r})
            _score(model, prefix, None, base[r].mean,
                   {h: (lambda x, m=means[h].to(device): m.expand_as(x)) for h in r})
        for t in targets:
            blocks = None
            if t.captured():  # prediction from the clean activations: FVU, L0, open-loop blocks
                x = torch.cat([acts[h] for h in t.in_hooks], dim=-1)
                latents, y = predict(t.sae, x)  # type: ignore[arg-type]
                truth = [acts[h] for h in t.out_hooks]
                recon[t.name].update(torch.cat(truth, dim=-1), y, latents)
                blocks = dict(zip(t.out_hooks, torch.split(y, t.sae.io.out_splits, dim=-1),  # type: ignore[union-attr]
                                  strict=True))
                for h, y_h, x_h in zip(t.out_hooks, blocks.values(), truth, strict=True):
                    if (t.name, h) in per_hook:
                        per_hook[t.name, h].update(x_h, y_h, latents)
            for r in t.replacements():
                if t.open_loop:
                    assert blocks is not None
                    replace = {h: (lambda _, b=blocks[h]: b) for h in r}
                elif isinstance(t.sae, CrossLayerTranscoder):
                    replace = _clt_closed_loop(t)
                else:
                    replace = _closed_loop(t, None if t.captured() else recon[t.name])
                _score(model, prefix, logp_clean, spliced[t.name, r], replace)
        if progress is not None:
            progress(int(scored.sum()))

    def losses(s: LossSums, b: _Baselines) -> dict[str, float]:
        return {
            "ce_clean": clean.mean_ce,
            "ce_sae": s.mean_ce,
            "ce_zero_ablation": b.zero.mean_ce,
            "ce_mean_ablation": b.mean.mean_ce,
            "loss_recovered_zero": loss_recovered(s.mean_ce, clean.mean_ce, b.zero.mean_ce),
            "loss_recovered_mean": loss_recovered(s.mean_ce, clean.mean_ce, b.mean.mean_ce),
            "kl": s.mean_kl,
        }

    results: dict[str, dict] = {}
    for t in targets:
        main, *alone = t.replacements()
        res: dict = {**losses(spliced[t.name, main], base[main]),
                     "l0": recon[t.name].l0, "fvu": recon[t.name].fvu, "n_tokens": clean.n,
                     "kind": t.kind, "spliced_hooks": list(main)}
        for h in t.out_hooks:
            if (t.name, h) in per_hook:
                res[f"fvu/{h}"] = per_hook[t.name, h].fvu
        if alone:
            res["per_hook"] = {r[0]: {**losses(spliced[t.name, r], base[r]),
                                      "fvu": per_hook[t.name, r[0]].fvu} for r in alone}
        results[t.name] = res
    return results


@torch.no_grad()
def hook_means(model: Any, hooks: list[str],
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
