"""Kill -9 a real `train-sae sweep` after its first checkpoint, resume it, and get the same bytes:
a one-hook sweep of SAEs (AuxK buffers, resampling after the kill point), a two-hook sweep
of per-hook SAEs plus a crosscoder, and skip transcoders plus CLTs (TopK and ReLU each) over two
input/output pairs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from synthetic import make_sparse_data, write_multihook_store, write_synthetic_store

from train_sae.cli import main

REPO = Path(__file__).resolve().parents[1]
SAE_FILES = ("sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl", "cfg.json")
CROSSCODER_FILES = ("crosscoder_weights.safetensors", "sparsity.safetensors", "metrics.jsonl",
                    "cfg.json", "relative_norms.safetensors", "relative_norms.png")
CLT_FILES = ("clt_weights.safetensors", "sparsity.safetensors", "metrics.jsonl", "cfg.json")
COMMON = ["--k", "4", "--l1", "1.0", "--lr", "3e-2", "--batch-size", "64", "--param",
          "dead_tokens_threshold=2000", "--log-every", "25", "--checkpoint-every", "50",
          "--device", "cpu"]
CASES = {
    # topk with a low dead threshold (AuxK buffers matter), relu resampling after the kill point
    "saes": (["--arch", "topk,relu", "--width", "96", "--tokens", str(64 * 600),
              "--resample-at", "0.5"],
             ["relu-w96-l11-lr0.03-rs", "topk-w96-dead2000-k4-lr0.03"]),
    "hooks_and_crosscoder": (["--hook", "all", "--arch", "topk,crosscoder", "--width", "48",
                              "--tokens", str(64 * 300)],
                             ["a--topk-w48-dead2000-k4-lr0.03", "b--topk-w48-dead2000-k4-lr0.03",
                              "crosscoder-w48-l11-lr0.03"]),
    # --k and --l1 make a TopK and a ReLU variant of each
    "transcoders_and_clt": (["--hook", "in0", "--hook", "in1", "--out-hook", "out0",
                             "--out-hook", "out1", "--arch", "skip_transcoder,clt", "--width", "48",
                             "--tokens", str(64 * 300)],
                            ["clt.relu-w48-l11-lr0.03", "clt.topk-w48-dead2000-k4-lr0.03",
                             "in0--skip_transcoder.relu-w48-l11-lr0.03",
                             "in0--skip_transcoder.topk-w48-dead2000-k4-lr0.03",
                             "in1--skip_transcoder.relu-w48-l11-lr0.03",
                             "in1--skip_transcoder.topk-w48-dead2000-k4-lr0.03"]),
}


def sweep_args(store: Path, out: Path, case: str) -> list[str]:
    return ["sweep", "--store", str(store), "--out", str(out), *CASES[case][0], *COMMON]


def run_main(monkeypatch, args: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["train-sae", *args])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None)


def write_store(path: Path, case: str) -> None:
    if case == "saes":
        x, _ = make_sparse_data(4096, 16, 32, 2, seed=3)
        write_synthetic_store(path, x, chunk_rows=512)
    elif case == "transcoders_and_clt":
        x0, _ = make_sparse_data(4096, 16, 32, 2, seed=3)
        x1, _ = make_sparse_data(4096, 16, 32, 2, seed=4)
        mix = torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
        write_multihook_store(path, {"in0": x0, "in1": x1, "out0": torch.relu(x0 @ mix),
                                     "out1": torch.relu((x0 + x1) @ mix)}, chunk_rows=512)
    else:
        x_a, _ = make_sparse_data(4096, 16, 32, 2, seed=3)
        x_b, _ = make_sparse_data(4096, 8, 16, 2, seed=4)
        write_multihook_store(path, {"a": x_a, "b": x_b}, chunk_rows=512)


@pytest.mark.parametrize("case", list(CASES))
def test_kill_and_resume_gives_identical_bytes(tmp_path, monkeypatch, case):
    store = tmp_path / "store"
    write_store(store, case)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train_sae.cli", *sweep_args(store, killed, case)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert json.loads((killed / "sweep.json").read_text())["status"] == "running"
    names = CASES[case][1]
    assert not any((killed / n / "cfg.json").exists() for n in names), "killed before the end"

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the killed run
    try:
        run_main(monkeypatch, [*sweep_args(store, killed, case), "--resume"])  # in this process
        run_main(monkeypatch, sweep_args(store, tmp_path / "ref", case))  # uninterrupted reference
    finally:
        torch.set_num_threads(old)

    assert sorted(p.name for p in (tmp_path / "ref").iterdir() if p.is_dir()) == names
    for name in names:
        files = (CROSSCODER_FILES if name.startswith("crosscoder") else
                 CLT_FILES if name.startswith("clt") else SAE_FILES)
        for f in files:
            assert (killed / name / f).read_bytes() == (tmp_path / "ref" / name / f).read_bytes(), \
                (name, f)
        a = json.loads((killed / name / "metrics.json").read_text())
        b = json.loads((tmp_path / "ref" / name / "metrics.json").read_text())
        assert a == b and a["status"] == "done"
    assert json.loads((killed / "sweep.json").read_text())["status"] == "complete"
    assert not (killed / "checkpoint.pt").exists()
    if case == "saes":
        check_resampling_after_resume(killed / "relu-w96-l11-lr0.03-rs")
    elif case == "transcoders_and_clt":
        doc = json.loads((killed / "clt.topk-w48-dead2000-k4-lr0.03" / "metrics.json").read_text())
        assert set(doc["final"]) >= {"fvu/out0", "fvu/out1"} and doc["out_hooks"] == ["out0", "out1"]
    else:
        doc = json.loads((killed / "crosscoder-w48-l11-lr0.03" / "metrics.json").read_text())
        assert set(doc["final"]) >= {"fvu/a", "fvu/b", "mse/a", "mse/b"}
        assert doc["relative_norms"]["hooks"] == ["a", "b"]


def check_resampling_after_resume(folder: Path) -> None:
    relu = json.loads((folder / "metrics.json").read_text())
    assert relu["steps"] == 600
    assert relu["resampled"] > 0, "resampling after the kill point used the rebuilt pool"
    # LR re-warm-up after the resampling at step 300: cosine from lr/10 over 30 steps (5% of 600)
    log = [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]
    lr = {rec["step"]: rec["lr"] for rec in log}  # "step" counts steps done; lr of the last one
    assert lr[300] == pytest.approx(3e-2)
    assert lr[325] == pytest.approx(3e-2 * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * 24 / 30))))
    assert lr[350] == pytest.approx(3e-2)
