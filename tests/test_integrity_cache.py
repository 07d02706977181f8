"""Stage 1 knows its data by content (issue: integrity): a resume whose model or dataset changed
content under the same name is refused, a complete store is not "resumed" with other options,
--overwrite removes only what cache-acts wrote, values a dtype cannot hold are refused with their
count, statistics stay finite for huge inputs, and a second writer is turned away."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from conftest import invoke, lock_held_elsewhere

import cache_acts.run as run_module
from cache_acts.cli import main
from cache_acts.state import STATE_FILE, TMP_DIR
from shared.lock import LOCK_FILE

CTX = 8
HOOK = "blocks.0.hook_resid_post"
TINY = dict(n_layers=1, d_model=16, d_mlp=32, n_heads=2, d_head=8, d_vocab=50, n_ctx=16,
            act_fn="gelu", normalization_type="LN", seed=0)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(TINY))
    write_tokens(tmp_path / "tok.parquet", seed=0)
    return tmp_path


def write_tokens(path, seed: int, n_seq: int = 40) -> None:
    ids = np.random.default_rng(seed).integers(0, 50, size=(n_seq, CTX))
    pq.write_table(pa.table({"ids": ids.tolist()}), path)


def args(root, out="store", *extra) -> list[str]:
    return ["run", "--model", f"random:{root / 'm.json'}", "--dataset", str(root / "tok.parquet"),
            "--token-column", "ids", "--context-size", str(CTX), "--no-bos", "--hook", HOOK,
            "--batch-size", "2", "--chunk-rows", "32", "--shuffle-memory", "8KiB",
            "--device", "cpu", "--out", str(root / out), *extra]


def cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    return invoke(main, "cache-acts", monkeypatch, capsys, *argv)


def interrupted_run(root, monkeypatch, capsys) -> None:
    """Start a run and crash it in pass 1 after a few committed batches."""
    real, calls = run_module.capture, []

    def crash_on_call_20(model, tokens, hooks):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(model, tokens, hooks)

    monkeypatch.setattr(run_module, "capture", crash_on_call_20)
    code, _, err = cli(monkeypatch, capsys, *args(root))
    monkeypatch.setattr(run_module, "capture", real)
    assert code == 2 and "interrupted" in err
    state = json.loads((root / "store" / TMP_DIR / STATE_FILE).read_text())
    assert state["phase"] == "scatter" and state["rows_done"] > 0


def test_resume_refuses_a_model_whose_config_changed(data, monkeypatch, capsys):
    interrupted_run(data, monkeypatch, capsys)
    (data / "m.json").write_text(json.dumps({**TINY, "seed": 1}))  # same name, other weights
    code, _, err = cli(monkeypatch, capsys, *args(data), "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "the model changed content since the run started" in err
    assert not (data / "store" / "zarr.json").exists()  # nothing that looks complete
    (data / "m.json").write_text(json.dumps(TINY))  # put it back: the run finishes
    code, _, err = cli(monkeypatch, capsys, *args(data), "--resume")
    assert code == 0, err


def test_resume_refuses_a_dataset_whose_content_changed(data, monkeypatch, capsys):
    interrupted_run(data, monkeypatch, capsys)
    write_tokens(data / "tok.parquet", seed=1)
    code, _, err = cli(monkeypatch, capsys, *args(data), "--resume")
    assert code == 2 and "the dataset changed content since the run started" in err


def test_resume_of_a_complete_store_checks_the_options(data, monkeypatch, capsys):
    assert cli(monkeypatch, capsys, *args(data), "--tokens", "200")[0] == 0
    before = (data / "store" / "zarr.json").read_bytes()
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "200", "--resume")
    assert code == 0 and "already complete; nothing to do" in err
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "300", "--seed", "3",
                       "--resume")
    assert code == 2 and "max_tokens (was 200, now 300)" in err and "seed (was 0, now 3)" in err
    write_tokens(data / "tok.parquet", seed=1)
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "200", "--resume")
    assert code == 2 and "the dataset changed content" in err
    assert (data / "store" / "zarr.json").read_bytes() == before


def test_the_manifest_records_fingerprints_and_a_moved_dataset_is_the_same(data, monkeypatch,
                                                                             capsys):
    assert cli(monkeypatch, capsys, *args(data), "--tokens", "200")[0] == 0
    m = zarr.open_group(str(data / "store"), mode="r").attrs["manifest"]
    fp = m["fingerprints"]
    assert fp["model"]["kind"] == "random" and len(fp["model"]["digest"]) == 64
    assert fp["dataset"]["kind"] == "local" and fp["dataset"]["files"] == 1
    assert m["settings"]["max_tokens"] == 200
    # the same bytes under other names are the same inputs
    (data / "tok.parquet").rename(data / "moved.parquet")
    (data / "m.json").rename(data / "m2.json")
    argv = args(data, "store", "--tokens", "200", "--resume")
    argv[argv.index("--dataset") + 1] = str(data / "moved.parquet")
    argv[argv.index("--model") + 1] = f"random:{data / 'm2.json'}"
    code, _, err = cli(monkeypatch, capsys, *argv)
    assert code == 0 and "nothing to do" in err


def test_overwrite_refuses_a_foreign_zarr_store_and_keeps_its_files(data, monkeypatch, capsys):
    foreign = data / "store"
    g = zarr.open_group(str(foreign), mode="w", zarr_format=3)
    g.create_array("weights", shape=(4,), dtype="f4")
    (foreign / "notes.txt").write_text("mine")
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "100", "--overwrite")
    assert code == 2 and "cache-acts did not write" in err and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "weights").is_dir()


def test_overwrite_keeps_user_files_inside_our_store(data, monkeypatch, capsys):
    assert cli(monkeypatch, capsys, *args(data), "--tokens", "100")[0] == 0
    (data / "store" / "analysis.ipynb").write_text("{}")
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "100", "--overwrite")
    assert code == 2 and "analysis.ipynb" in err
    assert (data / "store" / "analysis.ipynb").exists() and (data / "store" / "zarr.json").exists()
    (data / "store" / "analysis.ipynb").unlink()
    code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "150", "--overwrite")
    assert code == 0, err
    assert zarr.open_group(str(data / "store"), mode="r").attrs["manifest"]["n_rows"] == 150
    assert not (data / "store" / LOCK_FILE).exists()


def test_float16_overflow_is_refused_with_its_count(tmp_path, monkeypatch, capsys):
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    x[::3, 0] = 1e5  # 100 values above float16's 65504
    np.save(tmp_path / "a.npy", x)
    code, _, err = cli(monkeypatch, capsys, "import", str(tmp_path / "a.npy"), "--hook", "h",
                       "--out", str(tmp_path / "s"), "--dtype", "float16")
    assert code == 2 and "100 of the 2,400 values of hook 'h'" in err and "--dtype bfloat16" in err
    assert not (tmp_path / "s" / "zarr.json").exists()
    code, _, err = cli(monkeypatch, capsys, "import", str(tmp_path / "a.npy"), "--hook", "h",
                       "--out", str(tmp_path / "s2"), "--dtype", "bfloat16")
    assert code == 0, err


def test_nan_rows_in_an_import_are_refused(tmp_path, monkeypatch, capsys):
    x = np.ones((50, 4), dtype=np.float32)
    x[7, 2] = np.nan
    x[9, 1] = np.inf
    np.save(tmp_path / "a.npy", x)
    code, _, err = cli(monkeypatch, capsys, "import", str(tmp_path / "a.npy"), "--hook", "h",
                       "--out", str(tmp_path / "s"))
    assert code == 2 and "2 of the 200 values" in err and "input files hold them" in err


def test_statistics_of_huge_finite_values_stay_finite(tmp_path, monkeypatch, capsys):
    x = np.full((64, 4), 1e30, dtype=np.float32)  # squares overflow float32
    np.save(tmp_path / "a.npy", x)
    code, _, err = cli(monkeypatch, capsys, "import", str(tmp_path / "a.npy"), "--hook", "h",
                       "--out", str(tmp_path / "s"))
    assert code == 0, err
    stats = zarr.open_group(str(tmp_path / "s"), mode="r").attrs["manifest"]["stats"]["h"]
    assert stats["mean_norm"] == pytest.approx(2e30, rel=1e-6)  # sqrt(4) * 1e30


def test_a_second_writer_is_refused_while_the_first_holds_the_store(data, monkeypatch, capsys):
    with lock_held_elsewhere(data / "store", "cache-acts"):
        code, _, err = cli(monkeypatch, capsys, *args(data), "--tokens", "100", "--resume")
        assert code == 2 and "is being written by another run (cache-acts, pid" in err
    assert not (data / "store").exists()  # the refused run wrote nothing, the holder left none
    assert cli(monkeypatch, capsys, *args(data), "--tokens", "100")[0] == 0


def test_a_deleted_bucket_file_refuses_resume_with_one_line(data, monkeypatch, capsys):
    interrupted_run(data, monkeypatch, capsys)
    work = data / "store" / TMP_DIR
    state = json.loads((work / STATE_FILE).read_text())
    victim = next(b for b, size in enumerate(state["bucket_bytes"][0]) if size > 0)
    (work / f"bucket-{victim:05d}.rank-0.bin").unlink()  # cache_acts.shuffle.BucketFiles.path
    code, _, err = cli(monkeypatch, capsys, *args(data), "--resume")
    assert code == 2 and err.count("\n") == 1 and "were deleted or damaged" in err
    assert not (data / "store" / "zarr.json").exists()
