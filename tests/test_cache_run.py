"""`cache-acts run` end to end on a tiny random model and a pre-tokenized parquet file: the store
read back with plain zarr, exact permutation, activations equal to a forward pass, kill -9 and
--resume giving identical bytes, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from conftest import invoke

from cache_acts.cli import main
from cache_acts.state import STATE_FILE, TMP_DIR
from shared.models import capture, load_model
from shared.tokens import TokenSpec, iter_token_batches

CTX = 16
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
TINY = dict(n_layers=2, d_model=32, d_mlp=64, n_heads=4, d_head=8, d_vocab=100, n_ctx=32,
            act_fn="gelu", normalization_type="LN", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_run")
    (root / "tiny.json").write_text(json.dumps(TINY))
    ids = np.random.default_rng(0).integers(0, 100, size=(40, CTX))
    pq.write_table(pa.table({"ids": ids.tolist(), "text": ["x"] * 40}), root / "tok.parquet")
    return root


def base_args(root: Path, out: str = "store") -> list[str]:
    return ["run", "--model", f"random:{root / 'tiny.json'}", "--dataset",
            str(root / "tok.parquet"), "--token-column", "ids", "--context-size", str(CTX),
            "--no-bos", "--hook", HOOKS[0], "--hook", HOOKS[1], "--batch-size", "4",
            "--chunk-rows", "64", "--shuffle-memory", "16KiB", "--device", "cpu",
            "--out", str(root / out)]


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `cache-acts ARGS` in-process: (exit code, stdout, stderr)."""
    return invoke(main, "cache-acts", monkeypatch, capsys, *args)


def stream(root: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The source's token rows [n_seq, ctx] and a reference forward {hook: [n_seq, ctx, d]}."""
    loaded = load_model(f"random:{root / 'tiny.json'}")
    spec = TokenSpec(dataset=str(root / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    tokens = torch.cat([b.tokens for b in iter_token_batches(spec, None, 8)])
    return tokens, capture(loaded.model, tokens, HOOKS)


def test_run_store_reads_back_with_plain_zarr(monkeypatch, capsys, data):
    code, out, err = cli(monkeypatch, capsys, *base_args(data), "--tokens", "500",
                         "--dtype", "float32", "--seed", "7")
    assert code == 0, err
    assert "cached 500 tokens x 2 hook(s)" in out
    g = zarr.open_group(str(data / "store"), mode="r")
    m = g.attrs["manifest"]
    assert m["complete"] and m["n_rows"] == 500 and m["hooks"] == HOOKS and m["seed"] == 7
    assert m["d_in"] == {HOOKS[0]: 32, HOOKS[1]: 32} and m["context_size"] == CTX
    assert m["format_version"] == 2 and m["model"].startswith("random:")
    assert m["shard_rows"] == 512  # the default: one shard (128 MiB would be far more rows)
    for h in HOOKS:
        assert g[f"acts/{h}"].shape == (500, 32) and g[f"acts/{h}"].shards == (m["shard_rows"], 32)
    seq, pos, tok = g["seq_index"][:], g["position"][:], g["token_ids"][:]
    # the first 500 positions of the stream, each exactly once
    flat = seq.astype(np.int64) * CTX + pos
    assert np.array_equal(np.sort(flat), np.arange(500))
    assert abs(np.corrcoef(np.arange(500), flat)[0, 1]) < 0.15  # no trace of source order
    tokens, ref = stream(data)
    assert np.array_equal(tok, tokens[seq, pos].numpy())
    for h in HOOKS:
        x = g[f"acts/{h}"][:]
        assert np.allclose(x, ref[h][seq, pos].numpy(), atol=1e-5)
        x64 = x.astype(np.float64)
        assert np.allclose(m["stats"][h]["mean"], x64.mean(0), atol=1e-9)
        assert np.isclose(m["stats"][h]["mean_norm"], np.linalg.norm(x64, axis=1).mean())
    assert cli(monkeypatch, capsys, "verify", str(data / "store"))[0] == 0


def test_mlp_input_and_output_are_cached_aligned(monkeypatch, capsys, data):
    """What a transcoder trains on: an MLP's input (ln2.hook_normalized) and output (hook_mlp_out)
    in one pass, row for row: the model's own MLP maps every stored input row to its output."""
    hooks = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    args = base_args(data, "mlp")
    args[args.index(HOOKS[0])], args[args.index(HOOKS[1])] = hooks
    code, _, err = cli(monkeypatch, capsys, *args, "--tokens", "300")
    assert code == 0, err
    g = zarr.open_group(str(data / "mlp"), mode="r")
    x_in, x_out = (torch.from_numpy(g[f"acts/{h}"][:]) for h in hooks)
    mlp = load_model(f"random:{data / 'tiny.json'}").model.blocks[1].mlp
    with torch.no_grad():
        assert torch.allclose(mlp(x_in[:, None])[:, 0], x_out, atol=1e-5)


def test_drop_special_positions_are_not_cached(monkeypatch, capsys, data):
    """Positions the token source marks keep=False (BOS / pad with --drop-special) are skipped."""
    from cache_acts import run as run_module

    real = run_module.iter_token_batches

    def first_position_dropped(*args, **kwargs):
        for b in real(*args, **kwargs):
            b.keep[:, 0] = False
            yield b

    monkeypatch.setattr(run_module, "iter_token_batches", first_position_dropped)
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "drop"), "--dtype", "bfloat16")
    assert code == 0, err
    g = zarr.open_group(str(data / "drop"), mode="r")
    assert g.attrs["manifest"]["n_rows"] == 40 * (CTX - 1)
    assert g["position"][:].min() == 1 and g[f"acts/{HOOKS[0]}"].dtype == np.uint16
    seq, pos = g["seq_index"][:], g["position"][:]
    _, ref = stream(data)
    x = torch.from_numpy(g[f"acts/{HOOKS[0]}"][:].view(np.int16)).view(torch.bfloat16)
    assert torch.allclose(x.float(), ref[HOOKS[0]][seq, pos].bfloat16().float(), atol=1e-2)


def test_first_position_skips_early_positions_but_keeps_their_context(monkeypatch, capsys, data):
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "late"), "--first-position", "3")
    assert code == 0, err
    g = zarr.open_group(str(data / "late"), mode="r")
    m = g.attrs["manifest"]
    assert m["n_rows"] == 40 * (CTX - 3) and m["dataset"]["first_position"] == 3
    seq, pos = g["seq_index"][:], g["position"][:]
    assert sorted(zip(seq.tolist(), pos.tolist(), strict=True)) == [
        (s, p) for s in range(40) for p in range(3, CTX)]
    _, ref = stream(data)  # activations of full sequences: positions 0-2 were the context
    assert torch.allclose(torch.from_numpy(g[f"acts/{HOOKS[1]}"][:]), ref[HOOKS[1]][seq, pos],
                          atol=1e-5)
    _, text, _ = cli(monkeypatch, capsys, "info", str(data / "late"))
    assert "positions from 3" in text
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "late"), "--first-position", "3",
                       "--tokens", str(40 * (CTX - 3) + 1), "--overwrite")
    assert code == 2 and f"provides only {40 * (CTX - 3)} tokens" in err
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "bad"), "--first-position", str(CTX))
    assert code == 2 and err.startswith("error: first position 16 must be in 0..15")


def test_model_dtype_bfloat16(monkeypatch, capsys, data):
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "bf16"), "--model-dtype", "bfloat16",
                       "--tokens", "64")
    assert code == 0, err
    g = zarr.open_group(str(data / "bf16"), mode="r")
    assert g.attrs["manifest"]["model_info"]["dtype"] == "bfloat16"
    seq, pos = g["seq_index"][:], g["position"][:]
    loaded = load_model(f"random:{data / 'tiny.json'}", dtype="bfloat16")
    spec = TokenSpec(dataset=str(data / "tok.parquet"), token_column="ids", context_size=CTX,
                     prepend_bos=False)
    tokens = next(iter(iter_token_batches(spec, None, 4))).tokens
    ref = capture(loaded.model, tokens, HOOKS)[HOOKS[1]].float()
    x = g[f"acts/{HOOKS[1]}"][:]  # float32 store of a bfloat16 model
    assert np.allclose(x, ref[seq, pos].numpy(), atol=2e-2)
    assert not np.allclose(x, stream(data)[1][HOOKS[1]][seq, pos].numpy(), atol=1e-4)


def test_hook_is_required_with_a_model(monkeypatch, capsys, data):
    args = [a for a in base_args(data, "nohook") if a not in HOOKS and a != "--hook"]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "--hook is required with --model" in err


def test_tokens_beyond_the_dataset(monkeypatch, capsys, data):
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "big"), "--tokens", "1000")
    assert code == 2 and err.strip().splitlines() == [
        "error: the dataset provides only 640 tokens (at context size 16) but --tokens asks "
        "for 1000; lower --tokens or add data"]
    assert not (data / "big").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--hook", "blocks.0.hook_resid_pots"], "unknown hook 'blocks.0.hook_resid_pots'"),
        (["--context-size", "64"], "longer than the model's context (32)"),
        (["--token-column", "nope"], "nope"),
        (["--model", "not-a-model-xyz"], "unknown model 'not-a-model-xyz'"),
        (["--model", "random:/nonexistent/cfg.json"], "cannot read random-model config"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--tokens", "lots"], "cannot read count 'lots'"),
        (["--out", "nosuch://bucket/store"], "unknown URL scheme nosuch://"),
        (["--out", "gs://bucket/store"], "gs:// needs the optional filesystem package; install "
                                         "it with pip install 'sae-cache[gcs]'"),
    ],
)
def test_bad_run_input_is_one_line(monkeypatch, capsys, data, change, message):
    args = base_args(data, "bad")
    if change[0] == "--hook":
        args[args.index(HOOKS[1])] = change[1]
    else:
        args += change
    code, out, err = cli(monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert not (data / "bad").exists()


def test_existing_out_and_resume_settings(monkeypatch, capsys, data):
    assert cli(monkeypatch, capsys, *base_args(data, "again"), "--tokens", "100")[0] == 0
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "again"), "--tokens", "100")
    assert code == 2 and "already exists; pass --resume" in err
    # an interrupted run refuses to resume with other options
    state_dir = data / "again" / TMP_DIR
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_text(json.dumps(
        {"settings": {"seed": 0}, "n_buckets": 1}))
    manifest = json.loads((data / "again" / "zarr.json").read_text())
    manifest["attributes"]["manifest"]["complete"] = False
    (data / "again" / "zarr.json").write_text(json.dumps(manifest))
    code, _, err = cli(monkeypatch, capsys, *base_args(data, "again"), "--tokens", "100",
                       "--resume")
    assert code == 2 and "--resume of" in err and "different inputs" in err


def _state(out: Path) -> dict | None:
    try:
        return json.loads((out / TMP_DIR / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _run_until(args: list[str], out: Path, condition, timeout: float = 60) -> str:
    """Start cache-acts in a subprocess; SIGKILL it once condition(state) holds.
    Returns 'killed' or 'finished'."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cache_acts.cli import main; main()", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"},
    )
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        state = _state(out)
        if state is not None and condition(state):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.005)
    err = proc.communicate()[1].decode()
    assert proc.returncode == 0, err
    return "finished"


def _killable(data: Path, out: str) -> list[str]:
    """Arguments for a run with a commit after every batch (tiny write buffer) and every two
    chunks (shards of 128 rows)."""
    big = data / "big.parquet"
    if not big.exists():
        ids = np.random.default_rng(1).integers(0, 100, size=(200, CTX))
        pq.write_table(pa.table({"ids": ids.tolist()}), big)
    args = base_args(data, out)
    args[args.index(str(data / "tok.parquet"))] = str(big)
    args[args.index("4")] = "8"
    args[args.index("16KiB")] = "32KiB"
    return args + ["--shard-rows", "128"]


def _same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for p in [f"acts/{h}" for h in HOOKS] + ["token_ids", "seq_index", "position"]:
        assert np.array_equal(ga[p][:], gb[p][:]), p
    ma, mb = ga.attrs["manifest"], gb.attrs["manifest"]
    assert ma["stats"] == mb["stats"] and ma["checksums"] == mb["checksums"]
    assert ma["complete"] and mb["complete"]
    assert not (b / TMP_DIR).exists()


def test_kill_9_then_resume_gives_identical_arrays(monkeypatch, capsys, data):
    """Real subprocesses killed with SIGKILL in pass 1 and in pass 2, then resumed."""
    assert cli(monkeypatch, capsys, *_killable(data, "ref"))[0] == 0
    out = data / "killed"
    args = _killable(data, "killed")
    assert _run_until(args, out, lambda s: s["phase"] == "scatter" and s["rows_done"] > 0) \
        == "killed"
    code, _, err = cli(monkeypatch, capsys, "verify", str(out))
    assert code == 2 and "is not complete" in err and "--resume" in err  # points at the fix
    code, text, _ = cli(monkeypatch, capsys, "info", str(out))
    assert code == 0 and "an interrupted cache-acts run, still in pass 1" in text
    assert _run_until(args + ["--resume"], out,
                      lambda s: s["phase"] == "gather" and s["chunks_done"][0] >= 4) == "killed"
    code, _, err = cli(monkeypatch, capsys, "verify", str(out))
    assert code == 2 and "is not complete" in err
    code, _, err = cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    _same_store(data / "ref", out)


@pytest.mark.slow
def test_kill_9_at_random_moments(monkeypatch, capsys, data):
    """Killed at 8 random moments (start-up, pass 1, pass 2, the final manifest) and resumed."""
    if not (data / "ref").exists():
        assert cli(monkeypatch, capsys, *_killable(data, "ref"))[0] == 0
    out = data / "random-kills"
    args = _killable(data, "random-kills")
    rng = np.random.default_rng(0)
    for i in range(8):
        deadline = time.time() + rng.uniform(0, 12)
        _run_until(args + (["--resume"] if i else []), out,
                   lambda s, t=deadline: time.time() > t, timeout=120)
    code, _, err = cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    _same_store(data / "ref", out)


@pytest.mark.slow
def test_embedded_default(tmp_path, monkeypatch, capsys):
    """No --model / --dataset: SmolLM2-135M on Shakespeare at the default hook."""
    from shared.embedded import DEFAULT_HOOK

    code, out, err = cli(monkeypatch, capsys, "run", "--tokens", "256", "--batch-size", "2",
                         "--out", str(tmp_path / "demo"))
    assert code == 0, err
    m = zarr.open_group(str(tmp_path / "demo"), mode="r").attrs["manifest"]
    assert m["hooks"] == [DEFAULT_HOOK] and m["n_rows"] == 256 and m["d_in"][DEFAULT_HOOK] == 576
    assert m["model"].startswith("gguf:") and m["prepend_bos"]
