"""Stage 2 checks what it reads and whom it resumes (issue: integrity): a store replaced under
the same path, a flipped byte, swapped chunk files, a padded row count, NaN rows or overflowed
statistics stop training with one line; --overwrite removes only the sweep's own files; a
foreign checkpoint and a second writer are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import zarr
from conftest import flip_chunk_byte, invoke, lock_held_elsewhere, swap_chunk_bytes
from synthetic import make_sparse_data, write_synthetic_store

from train_sae.cli import main


def cli(monkeypatch, capsys, *args):
    return invoke(main, "train-sae", monkeypatch, capsys, *args)


def write_store(path, seed=0, n_rows=1024, x=None):
    if x is None:
        x, _ = make_sparse_data(n_rows, 8, 16, 2, seed=seed)
    write_synthetic_store(path, x, hook="h", chunk_rows=256)
    return path


def train_args(store, out, *extra):
    return ["sweep", "--store", store, "--out", out, "--batch-size", 64, "--device", "cpu",
            "--arch", "topk", "--width", 16, "--k", "2,4", *extra]


def one_line(code, err, message, want_code=2):
    """One `error:` line (after any progress output) naming the problem, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == want_code and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == errors[0]


def interrupted_sweep(store, out, monkeypatch, capsys) -> None:
    """A two-member sweep with checkpoints every 8 steps, stopped by Ctrl-C at step 10 of 16."""
    import train_sae.training.trainer as trainer

    real_step, calls = trainer.Member.step, []

    def crash_at_step_10(self, *a, **k):
        calls.append(1)
        if len(calls) == 20:  # two members
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(trainer.Member, "step", crash_at_step_10)
    code, _, _ = cli(monkeypatch, capsys, *train_args(store, out, "--checkpoint-every", 8))
    monkeypatch.setattr(trainer.Member, "step", real_step)
    assert code == 2 and (out / "checkpoint.pt").exists()


def test_resume_refuses_a_store_replaced_at_the_same_path(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    interrupted_sweep(store, out, monkeypatch, capsys)
    shutil.rmtree(store)
    write_store(store, seed=1)  # same path, other rows
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--checkpoint-every", 8),
                       "--resume")
    one_line(code, err, "is not the one the sweep in")
    shutil.rmtree(store)
    write_store(store, seed=0)  # the same content again: resumes
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--checkpoint-every", 8),
                       "--resume")
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["status"] == "complete"


def test_a_foreign_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    assert cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128))[0] == 0
    doc = json.loads((out / "sweep.json").read_text())
    doc["status"] = "running"
    (out / "sweep.json").write_text(json.dumps(doc))
    torch.save({"model": torch.zeros(3)}, out / "checkpoint.pt")
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128), "--resume")
    one_line(code, err, "is not a train-sae sweep checkpoint")
    (out / "checkpoint.pt").write_bytes(b"garbage")
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128), "--resume")
    one_line(code, err, "cannot be read")


def test_overwrite_removes_only_the_sweeps_own_files(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    assert cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128))[0] == 0
    member = next(p for p in out.iterdir() if p.is_dir())
    (member / "my_notes.md").write_text("keep me")
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128),
                       "--overwrite")
    one_line(code, err, "my_notes.md")
    assert (member / "my_notes.md").exists() and (member / "cfg.json").exists()
    (member / "my_notes.md").unlink()
    (out / "plots").mkdir()
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128),
                       "--overwrite")
    one_line(code, err, "plots")
    (out / "plots").rmdir()
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 192),
                       "--overwrite")
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["tokens"] == 192


def test_a_flipped_byte_stops_training(tmp_path, monkeypatch, capsys):
    store = write_store(tmp_path / "s")
    flip_chunk_byte(store, "acts/h", 2, at=100)
    code, _, err = cli(monkeypatch, capsys, *train_args(store, tmp_path / "o"))
    one_line(code, err, "row chunk 2 of hook 'h'")
    assert "fails its checksum" in err


def test_swapped_chunk_files_stop_training(tmp_path, monkeypatch, capsys):
    store = write_store(tmp_path / "s")
    swap_chunk_bytes(store, "acts/h", 0, 1)
    code, _, err = cli(monkeypatch, capsys, *train_args(store, tmp_path / "o"))
    one_line(code, err, "fails its checksum")


def test_a_padded_row_count_is_refused(tmp_path, monkeypatch, capsys):
    store = write_store(tmp_path / "s")
    g = zarr.open_group(str(store), mode="r+")
    m = dict(g.attrs["manifest"])
    m["n_rows"] = 1280  # 5 chunks claimed; the arrays hold 4
    m["checksums"] = {k: v + [0] for k, v in m["checksums"].items()}
    g.attrs["manifest"] = m
    code, _, err = cli(monkeypatch, capsys, *train_args(store, tmp_path / "o"))
    one_line(code, err, "has shape (1024, 8) but the manifest says (1280, 8)")


def test_nan_rows_are_blamed_on_the_store(tmp_path, monkeypatch, capsys):
    x, _ = make_sparse_data(1024, 8, 16, 2, seed=0)
    x[700, 3] = float("nan")
    store = write_store(tmp_path / "s", x=x)
    code, _, err = cli(monkeypatch, capsys, *train_args(store, tmp_path / "o"))
    one_line(code, err, "mean norm of nan")  # the statistics already say so
    code, _, err = cli(monkeypatch, capsys, *train_args(store, tmp_path / "o2"),
                       "--no-normalize")
    one_line(code, err, "holds 1 NaN/inf values in row chunk 2")
    assert "not the learning rate" in err


def test_a_second_writer_is_refused(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    with lock_held_elsewhere(out, "train-sae"):
        code, _, err = cli(monkeypatch, capsys, *train_args(store, out))
        one_line(code, err, "is being written by another run (train-sae, pid")
    assert not out.exists()  # the refused run wrote nothing, the holder left none


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_checksums_pass_on_good_16_bit_stores(tmp_path, monkeypatch, capsys, dtype):
    x, _ = make_sparse_data(512, 8, 16, 2, seed=0)
    write_synthetic_store(tmp_path / "s", x, chunk_rows=128, dtype=dtype)
    code, _, err = cli(monkeypatch, capsys, *train_args(tmp_path / "s", tmp_path / "o"))
    assert code == 0, err


def test_report_on_an_unfinished_sweep_lists_every_member(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    assert cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128))[0] == 0
    doc = json.loads((out / "sweep.json").read_text())
    doc["status"] = "running"  # as if killed while saving the second member
    (out / "sweep.json").write_text(json.dumps(doc))
    names = [m["name"] for m in doc["members"]]
    (out / names[1] / "metrics.json").unlink()
    code, _, err = cli(monkeypatch, capsys, "report", out)
    one_line(code, err, "is unfinished")
    assert f"2 members (1 done, 1 unfinished): {names[0]}: done; {names[1]}: unfinished" in err
    assert not (out / "report.md").exists()


def test_fvu_of_data_without_variance_is_not_perfect():
    from train_sae.evaluation.metrics import fvu

    x = torch.ones(16, 4)
    assert torch.isnan(fvu(x, x)) and fvu(x, x + 1).isnan()
    y = torch.randn(16, 4)
    assert fvu(y, y) == 0


def test_a_sweep_in_which_every_member_failed_exits_1(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    code, stdout, err = cli(monkeypatch, capsys, "sweep", "--store", store, "--out", out,
                            "--batch-size", 64, "--device", "cpu", "--arch", "topk",
                            "--width", 16, "--k", 2, "--lr", "1e6,1e7")
    one_line(code, err, "every member failed (2)", want_code=1)
    assert stdout.count("failed ") == 2 and "lower the learning rate" in stdout
    assert json.loads((out / "sweep.json").read_text())["results"] == {
        name: "failed" for name in json.loads((out / "sweep.json").read_text())["results"]}
    code, _, err = cli(monkeypatch, capsys, "sweep", "--store", store, "--out", tmp_path / "o2",
                       "--batch-size", 64, "--device", "cpu", "--arch", "topk",
                       "--width", 16, "--k", 2, "--lr", "1e-3,1e7")
    assert code == 0, err  # one member finished: the sweep did its job


def test_a_moved_store_resumes_and_the_sweep_records_where_it_is(tmp_path, monkeypatch, capsys):
    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    interrupted_sweep(store, out, monkeypatch, capsys)
    moved = tmp_path / "moved"
    store.rename(moved)
    code, _, err = cli(monkeypatch, capsys, *train_args(moved, out, "--checkpoint-every", 8),
                       "--resume")
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text())["store"] == str(moved.resolve())
    reference = tmp_path / "ref"
    assert cli(monkeypatch, capsys, *train_args(moved, reference))[0] == 0
    for member in (p.name for p in reference.iterdir() if p.is_dir()):
        assert (out / member / "sae_weights.safetensors").read_bytes() == \
            (reference / member / "sae_weights.safetensors").read_bytes()


def test_overwrite_keeps_its_own_lock_and_clears_a_killed_saving_folder(tmp_path, monkeypatch,
                                                                          capsys):
    import train_sae.training.outputs as outputs

    store, out = write_store(tmp_path / "s"), tmp_path / "o"
    assert cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128))[0] == 0
    member = next(p.name for p in out.iterdir() if p.is_dir())
    leftover = out / f".{member}.k3x9q"  # what a kill -9 inside crosscoder saving leaves
    leftover.mkdir()
    (leftover / "crosscoder_weights.safetensors").write_bytes(b"partial")
    seen = []
    real_remove = outputs.remove_sweep

    def remove_and_look(folder, doc):
        real_remove(folder, doc)
        seen.append((folder / ".lock").exists())

    monkeypatch.setattr(outputs, "remove_sweep", remove_and_look)
    code, _, err = cli(monkeypatch, capsys, *train_args(store, out, "--tokens", 128),
                       "--overwrite")
    assert code == 0, err
    assert seen == [True]  # the lock of the overwriting run stayed in place while it wrote
    assert not leftover.exists() and not (out / ".lock").exists()
