"""Stores on object storage end to end, against a real S3-compatible server (moto, on
127.0.0.1; the `s3` fixture in conftest.py): `cache-acts run` and `import` to s3://, `info`,
`verify`, `--resume` of a remote store, `train-sae sweep --store s3://...` and `eval`, each
compared with the same commands on a local folder; bad URLs as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import invoke, store_objects, write_tiny_run_inputs

from cache_acts import engine
from cache_acts.cli import main as cache_main
from shared.storage import location
from train_sae.cli import main as train_main

CTX = 16
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_run_inputs(tmp_path_factory.mktemp("s3data"), CTX)


def run_args(root: Path, out: str, *extra: str) -> list[str]:
    """480 of the 640 tokens (the rest held out for eval) in 8 chunks, 2 per shard: 4 shard
    objects per array."""
    return ["run", "--model", f"random:{root / 'tiny.json'}", "--dataset",
            str(root / "tok.parquet"), "--token-column", "ids", "--context-size", str(CTX),
            "--no-bos", "--hook", HOOK, "--batch-size", "4", "--tokens", "480", "--chunk-rows", "64",
            "--shard-rows", "128", "--shuffle-memory", "16KiB", "--device", "cpu",
            "--out", out, *extra]


def cache(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return invoke(cache_main, "cache-acts", monkeypatch, capsys, *args)


def train(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return invoke(train_main, "train-sae", monkeypatch, capsys, *args)


def one_error(code: int, err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_a_store_cached_to_s3_equals_the_local_one_and_trains_the_same(
        data, s3, tmp_path, monkeypatch, capsys):
    local, remote = str(tmp_path / "local"), s3.url("stores/tiny")
    for out in (local, remote):
        code, _, err = cache(monkeypatch, capsys, *run_args(data, out),
                             "--tmp-dir", str(tmp_path / "work"))
        assert code == 0, err
    assert store_objects(remote) == store_objects(local)  # every shard, every zarr.json, byte for byte
    shards = [k for k in store_objects(remote) if k.startswith(f"acts/{HOOK}/c/")]
    assert len(shards) == 4
    assert not any((tmp_path / "work").iterdir())  # the work folder is cleaned up
    code, out, _ = cache(monkeypatch, capsys, "verify", remote)
    assert code == 0 and out.startswith(f"ok: {remote} (480 rows")
    code, out, _ = cache(monkeypatch, capsys, "info", remote)
    assert code == 0 and "status       complete" in out and "stored" in out
    sweeps = {}
    for name, store in (("local", local), ("remote", remote)):
        sweeps[name] = tmp_path / f"sweep-{name}"
        code, _, err = train(monkeypatch, capsys, "sweep", "--store", store, "--out",
                             sweeps[name], "--arch", "topk", "--width", "64", "--k", "4,8",
                             "--batch-size", "64", "--device", "cpu")
        assert code == 0, err
    for member in ("topk-w64-k4-lr3.2e-3", "topk-w64-k8-lr3.2e-3"):
        a = (sweeps["local"] / member / "sae_weights.safetensors").read_bytes()
        assert a == (sweeps["remote"] / member / "sae_weights.safetensors").read_bytes()
    doc = json.loads((sweeps["remote"] / "sweep.json").read_text())
    assert doc["store"] == remote
    code, out, err = train(monkeypatch, capsys, "eval", sweeps["remote"], "--n-tokens", "64",
                           "--device", "cpu")
    assert code == 0, err
    assert "evaluated 2 SAE(s)" in out


def test_a_remote_run_resumes_from_its_local_work_folder(data, s3, tmp_path, monkeypatch,
                                                         capsys):
    """Crashed in pass 2 after a sealed shard: the bucket files and resume state are on local
    disk (--tmp-dir), the shards written so far in the bucket; --resume finishes the same
    bytes as an uninterrupted local run."""
    local, remote = str(tmp_path / "local"), s3.url("resumed")
    assert cache(monkeypatch, capsys, *run_args(data, local))[0] == 0
    real, calls = engine.write_chunk, [0]

    def crash(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    work = ["--tmp-dir", str(tmp_path / "work")]
    monkeypatch.setattr(engine, "write_chunk", crash)
    code, _, err = cache(monkeypatch, capsys, *run_args(data, remote), *work)
    one_error(code, err, "interrupted")
    monkeypatch.setattr(engine, "write_chunk", real)
    code, out, _ = cache(monkeypatch, capsys, "info", remote)
    assert "INCOMPLETE" in out
    code, _, err = cache(monkeypatch, capsys, *run_args(data, remote), *work)
    one_error(code, err, "already exists; pass --resume")
    code, _, err = cache(monkeypatch, capsys, *run_args(data, remote, "--resume"), *work)
    assert code == 0, err
    assert store_objects(remote) == store_objects(local)
    code, _, err = cache(monkeypatch, capsys, *run_args(data, remote, "--overwrite"), *work)
    assert code == 0, err
    assert store_objects(remote) == store_objects(local)


def test_import_to_s3_equals_the_local_import(s3, tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(2).normal(size=(700, 12)).astype("<f4"))
    args = ["import", str(tmp_path / "a.npy"), "--hook", "h", "--chunk-rows", "100",
            "--shuffle-memory", "8KiB", "--tmp-dir", str(tmp_path / "work"), "--out"]
    for out in (str(tmp_path / "local"), s3.url("imported")):
        code, _, err = cache(monkeypatch, capsys, *args, out)
        assert code == 0, err
    assert store_objects(s3.url("imported")) == store_objects(str(tmp_path / "local"))
    group = zarr.open_group(store=location(s3.url("imported")).zarr_store(), mode="r")
    assert group["acts/h"].shape == (700, 12)


def test_bad_remote_stores_are_one_line(data, s3, tmp_path, monkeypatch, capsys):
    code, _, err = cache(monkeypatch, capsys, *run_args(data, "s3://no-such-bucket-here/x"))
    one_error(code, err, "no-such-bucket-here", "does not exist")
    code, _, err = cache(monkeypatch, capsys, "verify", s3.url("nothing-here"))
    one_error(code, err, "no activation store at")
    code, _, err = train(monkeypatch, capsys, "sweep", "--store", "gs://bucket/store", "--out",
                         tmp_path / "o", "--arch", "topk", "--width", "8", "--k", "2")
    one_error(code, err, "pip install 'sae-cache[gcs]'")
    code, _, err = cache(monkeypatch, capsys, *run_args(data, str(tmp_path / "local")),
                         "--storage-option", "anon=true")
    one_error(code, err, "--storage-option applies only to remote URLs")


def test_batches_from_a_remote_store_equal_the_local_ones(data, s3, tmp_path, monkeypatch, capsys):
    """The loader's remote reader fetches the chunks of the batches ahead in parallel and
    gives the same batches as the memory-mapped local store."""
    from shared.store import open_store
    from train_sae.training.loader import ActivationLoader

    local, remote = str(tmp_path / "local"), s3.url("ahead")
    for out in (local, remote):
        assert cache(monkeypatch, capsys, *run_args(data, out))[0] == 0
    a = ActivationLoader(open_store(local), [HOOK], 48, 30, seed=3)
    b = ActivationLoader(open_store(location(remote)), [HOOK], 48, 30, seed=3)
    assert not b.store.memmappable()
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x[HOOK].numpy(), y[HOOK].numpy())
