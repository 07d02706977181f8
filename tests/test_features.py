"""`train-sae features`: the streaming statistics against full computations, the planted check
(a direction added exactly at one token id -> the latent aligned with it has that token as its
top context), the options, and bad input (one line, exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import invoke

from shared.store import (
    HookStats,
    Manifest,
    acts_path,
    create_store,
    default_shard_rows,
    open_store,
    seal,
    write_manifest,
    write_sequences,
)
from train_sae.cli import app as train_app
from train_sae.cli import main as train_main
from train_sae.evaluation.features.collect import HIST_BINS, LatentCollector
from train_sae.evaluation.features.examples import quantile_tables
from train_sae.training.loading import load_dictionary

HOOK = "synthetic"
VOCAB, CTX, N_SEQ, D = 40, 16, 256, 8
PLANTED = 7  # the token id whose rows carry the planted direction


def write_context_store(path: Path, x: torch.Tensor, tokens: np.ndarray, chunk_rows: int = 256,
                        with_sequences: bool = True, seed: int = 0) -> None:
    """A complete store of rows x [n_seq * ctx, d] (row s * ctx + p is sequence s, position p of
    `tokens` [n_seq, ctx]) in a fixed random order, with the packed sequences."""
    n_seq, ctx = tokens.shape
    n = n_seq * ctx
    perm = np.random.default_rng(seed).permutation(n)
    m = Manifest(model="synthetic", hooks=[HOOK], d_in={HOOK: x.shape[1]}, dtype="float32",
                 n_rows=n, context_size=ctx, seed=seed, chunk_rows=chunk_rows,
                 shard_rows=default_shard_rows(chunk_rows, {HOOK: x.shape[1]}, "float32", n),
                 dataset={"kind": "synthetic"})
    group = create_store(path, m)
    xs = x[torch.from_numpy(perm)]
    group[acts_path(HOOK)][...] = xs.numpy()
    group["token_ids"][...] = tokens.reshape(-1)[perm].astype(np.int32)
    group["seq_index"][...] = (perm // ctx).astype(np.int64)
    group["position"][...] = (perm % ctx).astype(np.int32)
    m.stats[HOOK] = HookStats(mean=xs.double().mean(0).tolist(),
                              mean_norm=xs.double().norm(dim=1).mean().item())
    if with_sequences:
        write_sequences(group, m, tokens.astype(np.int32))
    seal(group, m)
    write_manifest(group, m)


def planted_data(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """(rows [N_SEQ * CTX, D], tokens [N_SEQ, CTX], the planted unit direction [D]): noise plus
    five sparse background features, plus 4 x the planted direction exactly where the token is
    PLANTED."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (N_SEQ, CTX), generator=g).numpy()
    dirs = torch.nn.functional.normalize(torch.randn(6, D, generator=g), dim=1)
    n = N_SEQ * CTX
    codes = (torch.rand(n, 5, generator=g) < 0.08) * (1 + torch.rand(n, 5, generator=g))
    x = 0.05 * torch.randn(n, D, generator=g) + codes @ dirs[1:]
    x += 4.0 * torch.from_numpy(tokens.reshape(-1) == PLANTED)[:, None].float() * dirs[0]
    return x, tokens, dirs[0]


def read_jsonp(path: Path) -> list:
    """The arguments of a site data file's FEATURE_DATA.<call>(...) as JSON values."""
    text = path.read_text(encoding="utf-8")
    return json.loads("[" + text[text.index("(") + 1:text.rindex(")")] + "]")


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return invoke(train_main, "train-sae", monkeypatch, capsys, *args)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("features")
    x, tokens, direction = planted_data()
    write_context_store(root / "store", x, tokens)
    typer.main.get_command(train_app).main(
        ["sweep", "--store", str(root / "store"), "--out", str(root / "sweep"), "--arch",
         "topk,relu", "--k", "3", "--l1", "3e-2", "--width", "16", "--batch-size", "128",
         "--tokens", "48k", "--lr", "3e-3", "--device", "cpu", "--log-every", "50"], standalone_mode=False)
    return {"root": root, "x": x, "tokens": tokens, "direction": direction,
            "sweep": root / "sweep", "store": root / "store"}


@pytest.fixture(scope="module")
def site(planted) -> Path:
    out = planted["root"] / "site"
    code = typer.main.get_command(train_app).main(
        ["features", str(planted["sweep"]), "--out", str(out)], standalone_mode=False)
    assert not code
    return out


def members(site: Path) -> dict[str, str]:
    """member name -> its data folder name."""
    (info,) = read_jsonp(site / "data" / "site.js")
    return {m["name"]: m["dir"] for m in info["members"]}


def test_planted_token_tops_the_aligned_latent(planted, site):
    """For each member: the latent whose decoder is most aligned with the planted direction has
    only the planted token as its top contexts; the top example's activation is the member's
    encoder applied to that store row; density, mean and histogram are those of a full pass."""
    store = open_store(planted["store"])
    rows = store.read_rows(HOOK, 0, store.n_rows).float()
    token_ids = np.asarray(store.array("token_ids")[:])
    for name, d in members(site).items():
        model, _ = load_dictionary(planted["sweep"] / name)
        with torch.no_grad():  # the latent the planted direction drives hardest ...
            latent = int(model.encode(4.0 * planted["direction"][None])[0].argmax())
        cos = torch.nn.functional.normalize(model.W_dec[latent], dim=0) @ planted["direction"]
        assert cos > 0.8, (name, cos)  # ... writes it back
        _, _, page = read_jsonp(site / "data" / d / "l" / f"{latent}.js")
        top = page["top"]
        assert len(top) == 20
        assert all(ex["t"][ex["c"]] == PLANTED for ex in top)
        assert all(token_ids[ex["row"]] == PLANTED for ex in top)
        with torch.no_grad():
            acts = model.encode(rows)  # [n_rows, d_sae]: the full computation
        for ex in top[:3]:
            assert ex["act"] == pytest.approx(float(acts[ex["row"], latent]), rel=1e-5)
        want = acts[:, latent].topk(20).values.numpy()
        np.testing.assert_allclose([ex["act"] for ex in top], want, rtol=1e-5)
        firing = acts[:, latent] > 0
        assert page["count"] == int(firing.sum())
        assert page["mean"] == pytest.approx(float(acts[firing, latent].mean()), rel=1e-4)
        assert sum(page["hist"]["counts"]) == page["count"]
        (_, listing) = read_jsonp(site / "data" / d / "list.js")
        assert listing["tokens"][latent][0] == PLANTED
        assert listing["count"] == (acts > 0).sum(0).tolist()


def test_contexts_are_the_store_sequences_and_shading_is_the_encoder(planted, site):
    """Each example's tokens are its sequence's window in the store; each shaded token's
    activation is the encoder applied to the store row holding that token."""
    store = open_store(planted["store"])
    seq = np.asarray(store.array("seq_index")[:])
    pos = np.asarray(store.array("position")[:])
    row_of = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(seq, pos, strict=True))}
    rows = store.read_rows(HOOK, 0, store.n_rows).float()
    name, d = next(iter(members(site).items()))
    model, _ = load_dictionary(planted["sweep"] / name)
    with torch.no_grad():
        acts = model.encode(rows)
    checked = 0
    for latent in range(4):
        _, _, page = read_jsonp(site / "data" / d / "l" / f"{latent}.js")
        for ex in page["top"] + [e for q in page["quantiles"] for e in q["examples"]]:
            s, p = int(seq[ex["row"]]), int(pos[ex["row"]])
            start = p - ex["c"]
            assert ex["t"] == planted["tokens"][s, start:start + len(ex["t"])].tolist()
            for j, a in enumerate(ex["a"]):
                want = float(acts[row_of[(s, start + j)], latent])
                assert a == pytest.approx(want, rel=1e-4, abs=1e-5)
                checked += 1
    assert checked > 100


def test_quantile_samples_are_firing_rows_in_their_ranges(planted, site):
    name, d = next(iter(members(site).items()))
    for latent in range(16):
        _, _, page = read_jsonp(site / "data" / d / "l" / f"{latent}.js")
        if page["count"] == 0:
            assert page["top"] == [] and page["quantiles"] == []
            continue
        groups = page["quantiles"]
        assert 1 <= len(groups) <= 4
        n = sum(len(g["examples"]) for g in groups)
        assert n == min(32, page["count"])
        assert len({ex["row"] for g in groups for ex in g["examples"]}) == n
        for g in groups:
            assert all(g["low"] * 0.9999 <= ex["act"] <= g["high"] * 1.0001 for ex in g["examples"])
        assert all(a["high"] >= b["high"] for a, b in zip(groups, groups[1:], strict=False))


def test_collector_is_exact_whatever_the_batching():
    """Top-k, counts, sums and histogram equal full computations for any batch split; samples
    are firing rows with their own values."""
    g = torch.Generator().manual_seed(3)
    acts = torch.relu(torch.randn(700, 12, generator=g) - 0.8) * torch.rand(12, generator=g) * 10
    acts[:, 5] = 0  # a dead latent
    results = []
    for split in (700, 64, 13):
        c = LatentCollector(12, top=10, samples=16, seed=1)
        for lo in range(0, 700, split):
            c.add(acts[lo:lo + split], lo)
        results.append(c.result())
    full = acts.topk(10, dim=0)
    for r in results:
        live = full.values > 0
        np.testing.assert_array_equal(r.top_values[live.numpy()], full.values[live].numpy())
        np.testing.assert_array_equal(r.top_rows[live.numpy()], full.indices[live].numpy())
        assert (r.top_rows[~live.numpy()] == -1).all()
        np.testing.assert_array_equal(r.fire_count, (acts > 0).sum(0).numpy())
        np.testing.assert_allclose(r.act_sum, acts.double().sum(0).numpy(), rtol=1e-12)
        assert r.fire_count[5] == 0 and (r.sample_rows[:, 5] == -1).all()
        for j in range(12):
            if r.fire_count[j] == 0:
                continue
            w = r.hist_width[j]
            assert np.log2(w) == round(np.log2(w))  # a power of two
            assert acts[:, j].max() <= HIST_BINS * w < 2 * acts[:, j].max() * HIST_BINS
            edges = np.arange(HIST_BINS + 1) * w
            col = acts[:, j].double().numpy()
            want = np.array([((col > lo) & (col <= hi)).sum() for lo, hi in
                             zip(edges[:-1], edges[1:], strict=True)])
            np.testing.assert_array_equal(r.hist_counts[j], want)
            ok = r.sample_rows[:, j] >= 0
            assert ok.sum() == min(16, r.fire_count[j])
            np.testing.assert_array_equal(r.sample_values[ok, j],
                                          acts[r.sample_rows[ok, j], j].numpy())
    values, rows, bounds = quantile_tables(results[0].sample_values, results[0].sample_rows, 3)
    for j in range(12):
        n = int(min(16, results[0].fire_count[j]))
        assert (rows[:n, j] >= 0).all() and (rows[n:, j] == -1).all()
        assert (np.diff(values[:n, j]) <= 0).all()  # highest first
        sizes = [b - a for a, b in bounds[j]]
        assert sum(sizes) == n and max(sizes, default=0) - min(sizes, default=0) <= 1
    assert bounds[0] == [(0, 6), (6, 11), (11, 16)] and bounds[5] == []


def test_samples_are_uniform_over_firing_rows():
    """Each firing row is sampled with the same probability: 4 of 40 equally firing rows kept,
    over 400 seeds, each row about 40 times (chi-square, 39 degrees of freedom, p ~ 0.001
    bound 72)."""
    acts = torch.ones(40, 1)
    seen = np.zeros(40)
    for seed in range(400):
        c = LatentCollector(1, top=1, samples=4, seed=seed)
        for lo in range(0, 40, 7):
            c.add(acts[lo:lo + 7], lo)
        seen[c.result().sample_rows[:, 0]] += 1
    assert seen.sum() == 1600
    chi2 = ((seen - 40) ** 2 / 40).sum()
    assert chi2 < 72, seen


def test_rows_batch_size_member_latents_top(planted, tmp_path):
    """--rows reads only the first rows; --batch-size changes nothing; --member, --latents and
    --top choose what is written."""
    app = typer.main.get_command(train_app)
    name = next(iter(members_of(planted["sweep"])))
    args = ["features", str(planted["sweep"]), "--member", name, "--latents", "5", "--top", "3",
            "--rows", "1000"]
    app.main([*args, "--out", str(tmp_path / "a")], standalone_mode=False)
    app.main([*args, "--out", str(tmp_path / "b"), "--batch-size", "7"], standalone_mode=False)
    (info,) = read_jsonp(tmp_path / "a" / "data" / "site.js")
    assert [m["name"] for m in info["members"]] == [name] and info["rows"] == 1000
    assert sorted(p.name for p in (tmp_path / "a" / "data" / "m0" / "l").iterdir()) == [
        f"{i}.js" for i in range(5)]
    store = open_store(planted["store"])
    model, _ = load_dictionary(planted["sweep"] / name)
    with torch.no_grad():
        acts = model.encode(store.read_rows(HOOK, 0, 1000).float())[:, :5]
    (_, listing) = read_jsonp(tmp_path / "a" / "data" / "m0" / "list.js")
    assert listing["count"] == (acts > 0).sum(0).tolist()
    for i in range(5):
        _, _, a = read_jsonp(tmp_path / "a" / "data" / "m0" / "l" / f"{i}.js")
        _, _, b = read_jsonp(tmp_path / "b" / "data" / "m0" / "l" / f"{i}.js")
        assert len(a["top"]) == min(3, int((acts[:, i] > 0).sum()))
        assert all(ex["row"] < 1000 for ex in a["top"])
        assert [e["row"] for e in a["top"]] == [e["row"] for e in b["top"]]
        np.testing.assert_allclose([e["act"] for e in a["top"]], [e["act"] for e in b["top"]],
                                   rtol=1e-5)
        assert a["count"] == b["count"] and a["hist"] == b["hist"]


def members_of(sweep: Path) -> list[str]:
    return sorted(p.parent.name for p in sweep.glob("*/metrics.json"))


def test_a_store_without_sequences_shows_tokens_alone(planted, tmp_path):
    """An imported-style store (no sequences): the site says so; each example is its own token."""
    write_context_store(tmp_path / "store", planted["x"], planted["tokens"], with_sequences=False)
    app = typer.main.get_command(train_app)
    app.main(["sweep", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "sweep"),
              "--arch", "topk", "--k", "3", "--width", "16", "--batch-size", "128",
              "--device", "cpu"], standalone_mode=False)
    app.main(["features", str(tmp_path / "sweep"), "--latents", "3"], standalone_mode=False)
    site = tmp_path / "sweep" / "features"
    (info,) = read_jsonp(site / "data" / "site.js")
    assert not info["has_context"]
    assert any("keeps no token sequences" in n for n in info["notes"])
    _, _, page = read_jsonp(site / "data" / "m0" / "l" / "0.js")
    store = open_store(tmp_path / "store")
    for ex in page["top"]:
        assert ex["c"] == 0 and ex["t"] == [int(store.array("token_ids")[ex["row"]])]


def test_bad_input_is_one_line(planted, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(planted["sweep"], sweep)
    name = members_of(sweep)[0]

    def error(*args: str) -> str:
        code, _, err = cli(monkeypatch, capsys, "features", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    assert "more than" in error(str(sweep), "--latents", "17") and "at most 16" in error(
        str(sweep), "--latents", "17")
    assert "more than the store's 4,096 rows" in error(str(sweep), "--rows", "5000")
    assert "no member nope" in error(str(sweep), "--member", "nope")
    assert "--top must be at least 1" in error(str(sweep), "--top", "0")
    assert "is not cpu, cuda, cuda:N or auto" in error(str(sweep), "--device", "gpu")
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in error(str(sweep), "--device", "cuda:0")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not a feature browser" in error(str(sweep), "--out", str(foreign))
    assert (foreign / "notes.txt").read_text() == "mine"
    moved = tmp_path / "moved"
    shutil.move(str(planted["store"]), moved)
    try:
        line = error(str(sweep))
        assert "is not there any more" in line and "pass --store" in line
        assert error(str(sweep), "--store", str(tmp_path / "nothing")).startswith(
            "error: no activation store at")
        code, out, _ = cli(monkeypatch, capsys, "features", str(sweep), "--store", str(moved),
                           "--latents", "2", "--member", name)
        assert code == 0 and "feature browser of" in out
    finally:
        shutil.move(str(moved), planted["store"])
    (sweep / name / "sae_weights.safetensors").unlink()
    line = error(str(sweep / name))
    assert "is not a saved SAE" in line and "sae_weights.safetensors" in line


def test_rerun_replaces_its_own_site(planted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "site"
    for latents in ("4", "2"):
        code, _, _ = cli(monkeypatch, capsys, "features", str(planted["sweep"]), "--out", str(out),
                         "--latents", latents)
        assert code == 0
    assert len(list((out / "data" / "m0" / "l").iterdir())) == 2
    assert not (tmp_path / "site.partial").exists()
    assert (out / "index.html").exists() and (out / "app.js").exists()


def test_a_store_on_s3_through_storage_options(planted, site, s3, tmp_path, monkeypatch, capsys):
    """--store s3://... with --storage-option endpoint_url=... (the environment names no
    endpoint): the same pages as from the local copy of the store."""
    import s3fs
    from conftest import clear_fsspec_instances

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    fs.put(str(planted["store"]), f"{s3.name}/store", recursive=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    clear_fsspec_instances()
    code, _, err = cli(monkeypatch, capsys, "features", str(planted["sweep"]), "--store",
                       s3.url("store"), "--storage-option", f"endpoint_url={s3.endpoint}",
                       "--out", str(tmp_path / "remote"))
    assert code == 0, err
    for d in members(site).values():
        for name in ("list.js", "l/0.js", "l/9.js"):
            assert (tmp_path / "remote" / "data" / d / name).read_text() == (
                site / "data" / d / name).read_text()


@pytest.mark.parametrize("hook, residual", [
    ("blocks.3.hook_resid_post", True), ("blocks.0.hook_resid_pre", True),
    ("blocks.1.hook_mlp_out", True), ("blocks.1.hook_attn_out", True),
    ("blocks.3.hook_out", True), ("blocks.2.hook_in", True), ("blocks.3.attn.hook_out", True),
    ("blocks.3.mlp.hook_out", True), ("blocks.3.ln2.hook_out", False),
    ("ln_final.hook_out", False), ("blocks.0.attn.hook_z", False),
    ("blocks.0.mlp.hook_post", False), ("blocks.0.ln2.hook_normalized", False)])
def test_logit_tables_only_for_dictionaries_writing_the_residual_stream(hook, residual):
    """W_dec @ W_U means something only in the residual stream's basis (HookedTransformer's and
    TransformerBridge's names)."""
    from train_sae.evaluation.features.members import FeatureMember

    member = FeatureMember("m", Path("m"), None, "topk", [hook], hook)  # type: ignore[arg-type]
    assert member.writes_residual is residual
