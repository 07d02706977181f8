"""Splice evaluation of every kind of dictionary: transcoders, CLTs and crosscoders on a tiny
random model, each number against an independent computation with plain transformer_lens hooks;
then `train-sae sweep` + `train-sae eval` + `train-sae report` end to end on a transcoder and a
CLT cached from that kind of model."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from transformer_lens import HookedTransformer, HookedTransformerConfig

from cache_acts.run import RunConfig, run_cache
from shared.distributed import World
from shared.errors import UserError, run_cli
from shared.models import load_model
from shared.store import open_store
from shared.tokens import TokenSpec, iter_token_batches
from train_sae.cli import app as train_app
from train_sae.dictionaries import IO, Dictionary, build
from train_sae.evaluation.eval_sweep import EvalMember, spread
from train_sae.evaluation.evaluate import SpliceTarget, hook_means, splice_cost, splice_eval
from train_sae.evaluation.metrics import fvu as metrics_fvu
from train_sae.training.loading import load_dictionary

VOCAB = 40
LN2 = [f"blocks.{i}.ln2.hook_normalized" for i in range(2)]  # each MLP's input
MLP = [f"blocks.{i}.hook_mlp_out" for i in range(2)]  # each MLP's output
RESID = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


class ModelMLPs(Dictionary):
    """Predicts each layer's MLP output as `scale` times the model's own MLP of that layer's MLP
    input: with scale 1 a perfect transcoder (one layer) or CLT (several); latents = inputs."""

    arch = "model_mlps"

    def __init__(self, model: HookedTransformer, layers: list[int], kind: str,
                 scales: list[float] | None = None):
        d = model.cfg.d_model
        super().__init__(IO.of({f"in{la}": d for la in layers}, {f"out{la}": d for la in layers}),
                         d * len(layers), None)
        self.io_kind = kind
        self.mlps = [model.blocks[la].mlp for la in layers]  # not registered: the model's own
        self.scales = scales or [1.0] * len(layers)

    def encode(self, x):
        return x

    def decode(self, acts, x=None):
        blocks = x.split(self.io.in_splits, dim=-1)
        return torch.cat([s * mlp(b[None])[0] for s, mlp, b in
                          zip(self.scales, self.mlps, blocks, strict=True)], dim=-1)


class IdentityCrosscoder(Dictionary):
    """A perfect crosscoder: latents are the concatenated inputs themselves."""

    arch = "identity_crosscoder"
    io_kind = "crosscoder"

    def __init__(self, widths: dict[str, int]):
        super().__init__(IO.same(widths), sum(widths.values()), None)

    def encode(self, x):
        return x

    def decode(self, acts, x=None):
        return acts


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB,
        act_fn="gelu", normalization_type="LN", seed=3,
    )
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (6, 12), generator=g)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False  # a BOS-like position the store dropped: left clean, not scored
    return [(tokens[:4], keep[:4]), (tokens[4:], keep[4:])]


def _tokens(batches):
    return torch.cat([t for t, _ in batches]), torch.cat([k for _, k in batches])


def _ce_kl(model, tokens, keep, hooks) -> tuple[float, float]:
    """CE and KL(clean || hooked) over the scored positions, hooks as run_with_hooks takes them."""
    clean = torch.log_softmax(model(tokens)[:, :-1], -1)
    logp = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=hooks)[:, :-1], -1)
    scored = keep[:, 1:]
    ce = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    kl = (clean.exp() * (clean - logp)).sum(-1)
    return float(ce[scored].double().mean()), float(kl[scored].double().mean())


def _clean(model, tokens, hooks) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=hooks)
    return {h: cache[h] for h in hooks}


def _kept(keep):
    """A hook function replacing the kept positions by fn(activations there)."""
    def at(fn):
        def hook_fn(a, hook):
            out = a.clone()
            out[keep] = fn(a[keep])
            return out
        return hook_fn
    return at


def _fvu(y, y_hat) -> float:
    return float(metrics_fvu(y.double(), y_hat.double()))


# --- transcoders -------------------------------------------------------------------------------
def test_perfect_transcoder_recovers_all_the_loss(model, batches):
    tokens, keep = _tokens(batches)
    means = hook_means(model, [MLP[1]], batches)
    t = SpliceTarget("tc", None, ModelMLPs(model, [1], "transcoder"), [LN2[1]], [MLP[1]])
    r = splice_eval(model, [t], batches, means)["tc"]
    clean, _ = _ce_kl(model, tokens, keep, [])
    zero, _ = _ce_kl(model, tokens, keep, [(MLP[1], _kept(keep)(torch.zeros_like))])
    mean, _ = _ce_kl(model, tokens, keep,
                     [(MLP[1], _kept(keep)(lambda a: means[MLP[1]].expand_as(a)))])
    assert r["kind"] == "transcoder" and r["spliced_hooks"] == [MLP[1]]
    assert r["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert r["ce_sae"] == pytest.approx(clean, abs=1e-5)
    assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(r["kl"]) < 1e-6 and r["fvu"] == pytest.approx(0.0, abs=1e-9)
    # the baselines ablate the OUTPUT hook
    assert r["ce_zero_ablation"] == pytest.approx(zero, abs=1e-5)
    assert r["ce_mean_ablation"] == pytest.approx(mean, abs=1e-5)
    assert zero - clean > 0.01 and r["n_tokens"] == int(keep[:, 1:].sum())
    assert r["l0"] == pytest.approx(16.0)  # its latents are its 16-wide input, all nonzero


def test_zero_transcoder_is_the_zero_ablation(model, batches):
    tokens, keep = _tokens(batches)
    t = SpliceTarget("zero", None, ModelMLPs(model, [0], "transcoder", [0.0]), [LN2[0]], [MLP[0]])
    r = splice_eval(model, [t], batches, {MLP[0]: torch.zeros(16)})["zero"]
    zero, kl = _ce_kl(model, tokens, keep, [(MLP[0], _kept(keep)(torch.zeros_like))])
    assert r["ce_sae"] == pytest.approx(r["ce_zero_ablation"], abs=1e-6)
    assert r["ce_sae"] == pytest.approx(zero, abs=1e-5)
    assert r["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    assert r["kl"] == pytest.approx(kl, abs=1e-5) and kl > 1e-3
    y = _clean(model, tokens, [MLP[0]])[MLP[0]][keep]
    assert r["fvu"] == pytest.approx(_fvu(y, torch.zeros_like(y)), rel=1e-6)  # > 1: not centred


def _random_skip_transcoder(seed: int) -> Dictionary:
    tc = build("skip_transcoder", IO.of({LN2[1]: 16}, {MLP[1]: 16}), 48, {"k": 5}, seed)
    g = torch.Generator().manual_seed(seed)
    for p in (tc.W_skip, tc.b_enc, tc.b_dec):
        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tc.eval()


def test_skip_transcoder_matches_a_hand_written_splice(model, batches):
    """Input read in the spliced pass, output replaced: CE, KL, L0 and FVU by hand."""
    tokens, keep = _tokens(batches)
    tc = _random_skip_transcoder(1)
    r = splice_eval(model, [SpliceTarget("tc", None, tc, [LN2[1]], [MLP[1]])], batches,
                    {MLP[1]: torch.zeros(16)})["tc"]
    seen = {}

    def read(a, hook):
        seen["x"] = a[keep]

    ce, kl = _ce_kl(model, tokens, keep,
                    [(LN2[1], read), (MLP[1], _kept(keep)(lambda a: tc(seen["x"])))])
    clean = _clean(model, tokens, [LN2[1], MLP[1]])
    x, y = clean[LN2[1]][keep], clean[MLP[1]][keep]
    assert r["ce_sae"] == pytest.approx(ce, abs=1e-5) and r["kl"] == pytest.approx(kl, abs=1e-5)
    assert r["kl"] > 1e-3 and r["l0"] == pytest.approx(5.0)
    assert r["fvu"] == pytest.approx(_fvu(y, tc(x)), rel=1e-5)
    tc.W_skip.zero_()  # the skip connection is part of the spliced prediction
    again = splice_eval(model, [SpliceTarget("tc", None, tc, [LN2[1]], [MLP[1]])], batches,
                        {MLP[1]: torch.zeros(16)})["tc"]
    assert abs(again["ce_sae"] - r["ce_sae"]) > 1e-4


def test_transcoder_reading_a_hook_after_its_output_is_refused(model, batches):
    tc = ModelMLPs(model, [0], "transcoder")
    with pytest.raises(UserError, match="predicts blocks.0.hook_mlp_out from "
                                        "blocks.0.hook_resid_post, which the model computes after"):
        splice_eval(model, [SpliceTarget("late", None, tc, [RESID[0]], [MLP[0]])], batches,
                    {MLP[0]: torch.zeros(16)})


# --- cross-layer transcoders -------------------------------------------------------------------
def test_perfect_clt_recovers_all_the_loss(model, batches):
    tokens, keep = _tokens(batches)
    means = hook_means(model, MLP, batches)
    r = splice_eval(model, [SpliceTarget("clt", None, ModelMLPs(model, [0, 1], "clt"), LN2, MLP)],
                    batches, means)["clt"]
    both_zero, _ = _ce_kl(model, tokens, keep, [(h, _kept(keep)(torch.zeros_like)) for h in MLP])
    assert r["kind"] == "clt" and r["spliced_hooks"] == MLP
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(r["kl"]) < 1e-6
    assert r["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert r[f"fvu/{MLP[0]}"] == pytest.approx(0.0, abs=1e-9)
    assert r[f"fvu/{MLP[1]}"] == pytest.approx(0.0, abs=1e-9)
    # the baseline ablates every covered MLP output together
    assert r["ce_zero_ablation"] == pytest.approx(both_zero, abs=1e-5)
    assert "per_hook" not in r


def test_clt_splice_is_closed_loop(model, batches):
    """Layer 0's prediction halved, layer 1's exact for the input it reads: in the replacement
    model layer 1's MLP input is read after layer 0's output was replaced, so the whole splice is
    the model with only MLP 0 halved, which an open-loop splice (layer 1 predicted from the clean
    input) is not."""
    tokens, keep = _tokens(batches)
    clt = ModelMLPs(model, [0, 1], "clt", [0.5, 1.0])
    r = splice_eval(model, [SpliceTarget("clt", None, clt, LN2, MLP)], batches,
                    {h: torch.zeros(16) for h in MLP})["clt"]
    half = _kept(keep)(lambda a: 0.5 * a)
    closed, kl = _ce_kl(model, tokens, keep, [(MLP[0], half)])
    clean = _clean(model, tokens, MLP)
    open_loop, _ = _ce_kl(model, tokens, keep, [(MLP[0], half),
                                                (MLP[1], lambda a, hook: clean[MLP[1]])])
    assert r["ce_sae"] == pytest.approx(closed, abs=1e-5) and r["kl"] == pytest.approx(kl, abs=1e-5)
    assert abs(open_loop - closed) > 1e-3, "the test must tell the two splices apart"
    # FVU as in training: each layer's prediction from the clean inputs against the clean output
    y0 = clean[MLP[0]][keep]
    assert r[f"fvu/{MLP[0]}"] == pytest.approx(_fvu(y0, 0.5 * y0), rel=1e-5)
    assert r[f"fvu/{MLP[1]}"] == pytest.approx(0.0, abs=1e-9)


def test_random_clt_matches_a_hand_written_replacement_model(model, batches):
    tokens, keep = _tokens(batches)
    clt = build("clt", IO.of(dict.fromkeys(LN2, 16), dict.fromkeys(MLP, 16)), 32, {"k": 3}, 0)
    g = torch.Generator().manual_seed(4)
    clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=g) * 0.2)
    clt.b_enc.fill_(5.0)  # every pre-activation positive: TopK keeps exactly k per layer
    clt.eval()
    r = splice_eval(model, [SpliceTarget("clt", None, clt, LN2, MLP)], batches,
                    {h: torch.zeros(16) for h in MLP})["clt"]
    seen: dict[int, torch.Tensor] = {}

    def read(layer):
        def fn(a, hook):
            seen[layer] = a[keep]
        return fn

    def predict(layer):  # inputs of later layers as zeros
        def fn(a):
            x = torch.cat([seen.get(la, torch.zeros_like(seen[0])) for la in (0, 1)], -1)
            return clt(x)[:, 16 * layer:16 * (layer + 1)]
        return fn

    ce, kl = _ce_kl(model, tokens, keep, [(LN2[0], read(0)), (MLP[0], _kept(keep)(predict(0))),
                                          (LN2[1], read(1)), (MLP[1], _kept(keep)(predict(1)))])
    clean = _clean(model, tokens, LN2 + MLP)
    x = torch.cat([clean[h][keep] for h in LN2], -1)
    y = torch.cat([clean[h][keep] for h in MLP], -1)
    y_hat = clt(x)
    assert r["ce_sae"] == pytest.approx(ce, abs=1e-5) and r["kl"] == pytest.approx(kl, abs=1e-5)
    assert r["kl"] > 1e-3
    assert r["l0"] == pytest.approx(float((clt.encode(x) != 0).sum(1).float().mean()))
    assert r["l0"] == pytest.approx(6.0)  # k = 3 per layer
    assert r["fvu"] == pytest.approx(_fvu(y, y_hat), rel=1e-5)
    for i, h in enumerate(MLP):
        assert r[f"fvu/{h}"] == pytest.approx(_fvu(y[:, 16 * i:16 * (i + 1)],
                                                   y_hat[:, 16 * i:16 * (i + 1)]), rel=1e-5)


class SeenThroughForward(Dictionary):
    """A dictionary seen only through its encode / decode (the generic closed-loop splice)."""

    arch = "opaque"

    def __init__(self, inner: Dictionary):
        super().__init__(inner.io, inner.d_sae, None)
        self.io_kind = inner.io_kind
        self.inner = inner

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, acts, x=None):
        return self.inner.decode(acts, x)


@pytest.mark.parametrize("sparsity", ["topk", "relu", "jumprelu", "batchtopk"])
def test_clt_splice_by_layers_equals_the_generic_splice(model, batches, sparsity):
    """A CLT is spliced layer by layer (each layer's latents once): the numbers of the splice that
    runs the whole CLT at every output hook, for every sparsity."""
    params = {"sparsity": sparsity, **({"k": 3} if "topk" in sparsity else {})}
    clt = build("clt", IO.of(dict.fromkeys(LN2, 16), dict.fromkeys(MLP, 16)), 32, params, 1)
    g = torch.Generator().manual_seed(5)
    clt.b_enc.copy_(torch.randn(clt.b_enc.shape, generator=g))
    clt.b_dec.copy_(torch.randn(clt.b_dec.shape, generator=g) * 0.2)
    if sparsity == "jumprelu":
        clt.log_threshold.fill_(math.log(0.5))
    if sparsity == "batchtopk":
        clt.threshold.fill_(0.5)
    clt.eval()
    means = {h: torch.zeros(16) for h in MLP}
    fast = splice_eval(model, [SpliceTarget("c", None, clt, LN2, MLP)], batches, means)["c"]
    slow = splice_eval(model, [SpliceTarget("c", None, SeenThroughForward(clt), LN2, MLP)],
                       batches, means)["c"]
    assert fast["kl"] > 1e-3 and 0 < fast["l0"] < 32
    for key in ("ce_sae", "kl", "loss_recovered_zero", "l0", "fvu", *(f"fvu/{h}" for h in MLP)):
        assert fast[key] == pytest.approx(slow[key], rel=1e-5, abs=1e-6), key


# --- crosscoders -------------------------------------------------------------------------------
def test_perfect_crosscoder_one_hook_at_a_time_and_together(model, batches):
    tokens, keep = _tokens(batches)
    means = hook_means(model, RESID, batches)
    cc = IdentityCrosscoder(dict.fromkeys(RESID, 16))
    r = splice_eval(model, [SpliceTarget("cc", None, cc, RESID, RESID)], batches, means)["cc"]
    assert r["kind"] == "crosscoder" and r["spliced_hooks"] == RESID
    assert sorted(r["per_hook"]) == sorted(RESID)
    for res in (r, *r["per_hook"].values()):
        assert res["ce_sae"] == pytest.approx(res["ce_clean"], abs=1e-5)
        assert res["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
        assert res["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
        assert abs(res["kl"]) < 1e-6 and res["fvu"] == pytest.approx(0.0, abs=1e-9)
    # each result against the ablation of the hooks it replaces
    both, _ = _ce_kl(model, tokens, keep, [(h, _kept(keep)(torch.zeros_like)) for h in RESID])
    assert r["ce_zero_ablation"] == pytest.approx(both, abs=1e-5)
    for h in RESID:
        alone, _ = _ce_kl(model, tokens, keep, [(h, _kept(keep)(torch.zeros_like))])
        assert r["per_hook"][h]["ce_zero_ablation"] == pytest.approx(alone, abs=1e-5)
    assert r["per_hook"][RESID[0]]["ce_zero_ablation"] != r["per_hook"][RESID[1]]["ce_zero_ablation"]


def test_random_crosscoder_is_spliced_open_loop(model, batches):
    """Its reconstruction is computed from the clean activations of both hooks; each block is
    spliced alone and both together (the second hook gets its block from the clean pass)."""
    tokens, keep = _tokens(batches)
    cc = build("crosscoder_topk", IO.same(dict.fromkeys(RESID, 16)), 48, {"k": 6}, 2).eval()
    cc.W_dec.mul_(30.0)  # a reconstruction of the activations' size, so splicing matters
    r = splice_eval(model, [SpliceTarget("cc", None, cc, RESID, RESID)], batches,
                    {h: torch.zeros(16) for h in RESID})["cc"]
    clean = _clean(model, tokens, RESID)
    x = torch.cat([clean[h][keep] for h in RESID], -1)
    blocks = dict(zip(RESID, cc(x).split(16, -1), strict=True))
    put = {h: _kept(keep)(lambda a, b=blocks[h]: b) for h in RESID}
    together = _ce_kl(model, tokens, keep, [(h, put[h]) for h in RESID])
    assert (r["ce_sae"], r["kl"]) == pytest.approx(together, abs=1e-5)
    assert r["fvu"] == pytest.approx(_fvu(x, cc(x)), rel=1e-5)
    assert r["l0"] == pytest.approx(6.0)
    for i, h in enumerate(RESID):
        one = r["per_hook"][h]
        assert (one["ce_sae"], one["kl"]) == pytest.approx(
            _ce_kl(model, tokens, keep, [(h, put[h])]), abs=1e-5)
        assert one["fvu"] == pytest.approx(r[f"fvu/{h}"])
        assert one["fvu"] == pytest.approx(_fvu(x[:, 16 * i:16 * (i + 1)], blocks[h]), rel=1e-5)
        assert one["kl"] > 1e-3
    # closed-loop (the second hook's block from its spliced activation) would differ
    seen = {}

    def closed_second(a):
        return cc(torch.cat([seen["a"], a], -1))[:, 16:]

    def closed_first(a):
        seen["a"] = blocks[RESID[0]]
        return blocks[RESID[0]]

    closed, _ = _ce_kl(model, tokens, keep, [(RESID[0], _kept(keep)(closed_first)),
                                             (RESID[1], _kept(keep)(closed_second))])
    assert abs(closed - r["ce_sae"]) > 1e-4


# --- spreading over ranks ----------------------------------------------------------------------
def test_spread_costs_count_every_spliced_pass(model):
    d = 16
    sae = SpliceTarget("sae", "blocks.1.hook_resid_post", None)
    tc = SpliceTarget("tc", None, ModelMLPs(model, [1], "transcoder"), [LN2[1]], [MLP[1]])
    clt = SpliceTarget("clt", None, ModelMLPs(model, [0, 1], "clt"), LN2, MLP)
    cc = SpliceTarget("cc", None, IdentityCrosscoder({"a": d, "b": d}),
                      ["blocks.1.hook_resid_pre", "ln_final.hook_normalized"], [])
    # 2 blocks + unembedding from each pass's first block: SAE and transcoder from block 1;
    # the CLT from block 0; the crosscoder together (from 1), then each hook alone (1 and 2 -> 0)
    assert [splice_cost(t, 2) for t in (sae, tc, clt, cc)] == [2, 2, 3, 2 + 2 + 1]
    members = [EvalMember(t.name, Path(t.name), t, "") for t in (sae, tc, clt, cc)]
    shares = [[m.name for m in spread(members, 2, World(r, 2))] for r in (0, 1)]
    # largest first: cc (5) -> 0, clt (3) -> 1, sae (2) -> 1 (5), tc (2) -> 0 on the tie (7)
    assert shares == [["tc", "cc"], ["sae", "clt"]]


# --- end to end: sweep, eval, report -----------------------------------------------------------
CTX = 16
CACHED = 64


def _model_json(path: Path, seed: int = 5) -> Path:
    path.write_text(json.dumps({
        "n_layers": 2, "d_model": 16, "n_ctx": 32, "d_head": 4, "n_heads": 4, "d_mlp": 32,
        "d_vocab": 48, "act_fn": "gelu", "normalization_type": "LN", "seed": seed}))
    return path


def _cli(*args: str) -> None:
    run_cli(partial(train_app, list(args)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A store of both layers' MLP inputs and outputs; a sweep of a transcoder and an SAE on
    layer 0 (the README's command), and one of a CLT over both layers."""
    root = tmp_path_factory.mktemp("evaldict")
    model = _model_json(root / "model.json")
    g = torch.Generator().manual_seed(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for _ in range(120):
            n = int(torch.randint(5, 30, (1,), generator=g))
            f.write(json.dumps({"ids": torch.randint(1, 48, (n,), generator=g).tolist()}) + "\n")
    spec = TokenSpec(dataset=str(data), token_column="ids", context_size=CTX, prepend_bos=False)
    store = root / "store"
    run_cache(RunConfig(out=store, tokens=spec, model=f"random:{model}", hooks=LN2 + MLP,
                        max_tokens=CACHED * CTX, batch_size=8, chunk_rows=128))
    app = typer.main.get_command(train_app)
    common = ["--batch-size", "64", "--tokens", "20000", "--device", "cpu", "--log-every", "50",
              "--width", "32", "--k", "4"]
    app.main(["sweep", "--store", str(store), "--out", str(root / "tc"),
              "--arch", "transcoder,topk", "--hook", LN2[0], "--out-hook", MLP[0], *common],
             standalone_mode=False)
    app.main(["sweep", "--store", str(store), "--out", str(root / "clt"), "--arch", "clt",
              "--hook", LN2[0], "--hook", LN2[1], "--out-hook", MLP[0], "--out-hook", MLP[1],
              *common], standalone_mode=False)
    return {"root": root, "model": model, "data": data, "store": store, "tc": root / "tc",
            "clt": root / "clt"}


def _held_out(trained, n_seq: int) -> torch.Tensor:
    n_cached = int(open_store(trained["store"]).array("seq_index")[:].max()) + 1
    spec = TokenSpec(dataset=str(trained["data"]), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    held = torch.cat([b.tokens for b in iter_token_batches(spec, None, 100, n_cached, n_seq)])
    assert held.shape == (n_seq, CTX)
    return held


def test_sweep_eval_and_report_of_a_transcoder(trained, capsys):
    sweep = trained["tc"]
    _cli("eval", str(sweep), "--n-tokens", "256", "--batch-size", "8", "--device", "cpu")
    out = capsys.readouterr().out
    assert "evaluated 1 SAE(s) and 1 transcoder(s) on 240 next-token predictions" in out
    (folder,) = [p for p in sweep.iterdir() if p.name.startswith("transcoder")]
    ev = json.loads((folder / "metrics.json").read_text())["eval"]
    assert ev["kind"] == "transcoder" and ev["spliced_hooks"] == [MLP[0]]
    assert math.isfinite(ev["loss_recovered_zero"]) and ev["loss_recovered_zero"] > 0
    assert ev["ce_sae"] < ev["ce_zero_ablation"] and ev["l0"] == pytest.approx(4.0)
    assert 0 < ev["fvu"] < 0.5  # trained: well under the mean predictor's 1
    # the same numbers by hand: its MLP input read, its MLP output replaced
    held = _held_out(trained, 16)
    lm = load_model(f"random:{trained['model']}").model
    tc, _ = load_dictionary(folder)
    seen = {}
    logits = lm.run_with_hooks(held, fwd_hooks=[
        (LN2[0], lambda a, hook: seen.update(x=a)), (MLP[0], lambda a, hook: tc(seen["x"]))])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 48), held[:, 1:].reshape(-1))
    assert ev["ce_sae"] == pytest.approx(float(ce), abs=1e-5)
    mean = torch.tensor(open_store(trained["store"]).manifest.stats[MLP[0]].mean)
    logits = lm.run_with_hooks(held, fwd_hooks=[(MLP[0], lambda a, hook: mean.expand_as(a))])
    ce_mean = F.cross_entropy(logits[:, :-1].reshape(-1, 48), held[:, 1:].reshape(-1))
    assert ev["ce_mean_ablation"] == pytest.approx(float(ce_mean), abs=1e-5)
    # the report lists it beside the SAE, on its own (input -> output) frontier
    _cli("report", str(sweep))
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if ln.startswith(f"| {folder.name} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "transcoder" and f"{ev['loss_recovered_zero']:.4g}" in cells
    assert cells[-1] == "FVU, loss"
    assert "a transcoder replaces its output hook" in (sweep / "report.md").read_text()


def test_sweep_eval_of_a_clt_is_the_replacement_model(trained, capsys):
    sweep = trained["clt"]
    _cli("eval", str(sweep), "--n-tokens", "128", "--batch-size", "8", "--device", "cpu")
    assert "evaluated 1 CLT(s) on 120 next-token predictions" in capsys.readouterr().out
    (folder,) = [p for p in sweep.iterdir() if p.is_dir()]
    ev = json.loads((folder / "metrics.json").read_text())["eval"]
    assert ev["kind"] == "clt" and ev["spliced_hooks"] == MLP
    assert ev["l0"] == pytest.approx(8.0)  # k = 4 per layer
    assert all(0 < ev[f"fvu/{h}"] < 1 for h in MLP) and ev["loss_recovered_zero"] > 0
    held = _held_out(trained, 8)
    lm = load_model(f"random:{trained['model']}").model
    clt, _ = load_dictionary(folder)
    seen: dict[int, torch.Tensor] = {}

    def read(i):
        return lambda a, hook: seen.update({i: a})

    def replace(i):
        def fn(a, hook):
            x = torch.cat([seen.get(j, torch.zeros_like(a)) for j in (0, 1)], -1)
            return clt(x.reshape(-1, 32)).reshape(*a.shape[:2], 32)[..., 16 * i:16 * (i + 1)]
        return fn

    logits = lm.run_with_hooks(held, fwd_hooks=[(LN2[0], read(0)), (MLP[0], replace(0)),
                                                (LN2[1], read(1)), (MLP[1], replace(1))])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 48), held[:, 1:].reshape(-1))
    assert ev["ce_sae"] == pytest.approx(float(ce), abs=1e-5)
    _cli("report", str(sweep))
    table = capsys.readouterr().out
    assert f"{MLP[0]} " in table and f"{MLP[1]} " in table  # FVU per hook of the CLT's row


def _one_line_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        _cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_eval_bad_input_is_one_line(trained, tmp_path, capsys):
    assert "no run folders" in _one_line_error(capsys, "eval", str(tmp_path), "--device", "cpu")
    copy = tmp_path / "tc"
    shutil.copytree(trained["tc"], copy)
    (folder,) = [p for p in copy.iterdir() if p.name.startswith("transcoder")]
    cfg_path = folder / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for name, value, message in (
            ("hook_name_out", "blocks.7.hook_mlp_out", "unknown hook 'blocks.7.hook_mlp_out'"),
            ("hook_name", RESID[0], "which the model computes after")):
        cfg_path.write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], name: value}}))
        err = _one_line_error(capsys, "eval", str(folder), "--device", "cpu")
        assert message in err, err
