"""`cache-acts import`, `info` and `verify`, through the real CLI entry point (in-process)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import zarr
from conftest import flip_chunk_byte, invoke
from safetensors.torch import save_file

from cache_acts import engine
from cache_acts.cli import main
from cache_acts.shuffle import BucketFiles, last_chunk_of_buckets
from cache_acts.state import RunState
from shared.errors import UserError
from shared.store import checksum, open_store


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `cache-acts ARGS` in-process: (exit code, stdout, stderr)."""
    return invoke(main, "cache-acts", monkeypatch, capsys, *args)


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((700, 8)).astype(np.float32)
    b = rng.standard_normal((333, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    save_file({"acts": torch.from_numpy(b)}, str(tmp_path / "b.safetensors"))
    return tmp_path, [a, b]


def _import(monkeypatch, capsys, folder, *extra):
    return cli(monkeypatch, capsys, "import", str(folder / "a.npy"), str(folder / "b.safetensors"),
               "--hook", "resid", "--out", str(folder / "store"), "--chunk-rows", "64",
               "--shuffle-memory", "8KiB", *extra)


def test_several_aligned_hooks_import_row_for_row(monkeypatch, capsys, sources):
    """--hook NAME=FILE[,FILE...] repeated: an MLP's input (two files) and output (one file of
    another width, split differently) stored aligned: row i of both hooks is the same source
    row, seq_index/position follow the first hook's files."""
    folder, (a, b) = sources
    x_in = np.concatenate([a, b])  # [1033, 8]
    y_out = np.tanh(x_in @ np.random.default_rng(1).standard_normal((8, 12))).astype(np.float32)
    np.save(folder / "out.npy", y_out)
    code, out, err = cli(monkeypatch, capsys, "import", "--out", str(folder / "pair"),
                         "--hook", f"mlp_in={folder / 'a.npy'},{folder / 'b.safetensors'}",
                         "--hook", f"mlp_out={folder / 'out.npy'}", "--chunk-rows", "64",
                         "--shuffle-memory", "8KiB")
    assert code == 0, err
    assert "imported 1,033 rows of 2 hook(s) from 3 file(s)" in out
    g = zarr.open_group(str(folder / "pair"), mode="r")
    m = g.attrs["manifest"]
    assert m["hooks"] == ["mlp_in", "mlp_out"] and m["d_in"] == {"mlp_in": 8, "mlp_out": 12}
    f, r = g["seq_index"][:], g["position"][:]
    row = np.where(f == 0, r, 700 + r)  # the source row of every stored row
    assert sorted(row.tolist()) == list(range(1033))
    assert np.array_equal(g["acts/mlp_in"][:], x_in[row])
    assert np.array_equal(g["acts/mlp_out"][:], y_out[row])
    assert cli(monkeypatch, capsys, "verify", str(folder / "pair"))[0] == 0


@pytest.mark.parametrize("hooks, files, message", [
    ([], ["a.npy"], "--hook is missing"),
    (["h", "g"], ["a.npy"], "--hook is given 2 times without files"),
    (["h"], [], "no input files for --hook h"),
    (["h=a.npy", "g"], [], "use one form"),
    (["h=a.npy"], ["a.npy"], "use one form"),
    (["h=a.npy", "h=b.safetensors"], [], "--hook h is given twice"),
    (["h=a.npy", "g=b.safetensors"], [], "hook 'g' has 333 rows but 'h' has 700"),
    (["h=", "g=a.npy"], [], "no input files for hook 'h'"),
])
def test_bad_import_hooks_are_one_line(monkeypatch, capsys, sources, hooks, files, message):
    folder, _ = sources
    argv = ["import", "--out", str(folder / "bad"), *[str(folder / f) for f in files]]
    for h in hooks:
        name, sep, paths = h.partition("=")
        argv += ["--hook", name + sep + ",".join(str(folder / p) for p in paths.split(",") if p)]
    code, _, err = cli(monkeypatch, capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (folder / "bad").exists()


def test_import_reads_back_with_plain_zarr(monkeypatch, capsys, sources):
    folder, (a, b) = sources
    code, out, err = _import(monkeypatch, capsys, folder, "--model", "gpt2")
    assert code == 0, err
    assert "imported 1,033 rows" in out
    g = zarr.open_group(str(folder / "store"), mode="r")
    m = g.attrs["manifest"]
    assert m["complete"] and m["n_rows"] == 1033 and m["d_in"] == {"resid": 8}
    assert m["model"] == "gpt2" and m["hooks"] == ["resid"] and m["dtype"] == "float32"
    assert g["acts/resid"].shape == (1033, 8) and g["token_ids"].shape == (1033,)
    x, f, r = g["acts/resid"][:], g["seq_index"][:], g["position"][:]
    # (file, row) pairs are an exact permutation of the sources, and rows carry their data
    pairs = sorted(zip(f.tolist(), r.tolist(), strict=True))
    assert pairs == [(0, i) for i in range(700)] + [(1, i) for i in range(333)]
    src = [a, b]
    assert all(np.array_equal(x[i], src[f[i]][r[i]]) for i in range(len(x)))
    assert (g["token_ids"][:] == -1).all()
    # shuffled: source order is not preserved, and it is not in blocks
    assert abs(np.corrcoef(np.arange(1033), f * 1000 + r)[0, 1]) < 0.15
    both = np.concatenate([a, b]).astype(np.float64)
    assert np.allclose(m["stats"]["resid"]["mean"], both.mean(0), atol=1e-12)
    assert np.isclose(m["stats"]["resid"]["mean_norm"], np.linalg.norm(both, axis=1).mean())
    assert m["checksums"]["acts/resid"][0] == checksum(x[:64])


def test_same_seed_same_bytes_other_seed_other_order(monkeypatch, capsys, sources):
    folder, _ = sources
    assert _import(monkeypatch, capsys, folder)[0] == 0
    first = zarr.open_group(str(folder / "store"))["position"][:]
    assert _import(monkeypatch, capsys, folder, "--overwrite")[0] == 0
    assert np.array_equal(zarr.open_group(str(folder / "store"))["position"][:], first)
    assert _import(monkeypatch, capsys, folder, "--overwrite", "--seed", "1")[0] == 0
    assert not np.array_equal(zarr.open_group(str(folder / "store"))["position"][:], first)


def test_bfloat16_zstd_store(monkeypatch, capsys, sources):
    folder, (a, b) = sources
    code, _, err = _import(monkeypatch, capsys, folder, "--dtype", "bfloat16",
                           "--compression", "zstd:5")
    assert code == 0, err
    store = open_store(folder / "store")
    assert store.manifest.compression == "zstd:5" and store.acts("resid").dtype == np.uint16
    assert not store.memmappable()
    x = store.read_rows("resid", 0, 1033)
    assert x.dtype == torch.bfloat16
    f, r = store.array("seq_index")[:], store.array("position")[:]
    want = torch.from_numpy(np.stack([[a, b][f[i]][r[i]] for i in range(1033)])).bfloat16()
    assert torch.equal(x, want)
    assert cli(monkeypatch, capsys, "verify", str(folder / "store"))[0] == 0


def test_info_and_verify(monkeypatch, capsys, sources):
    folder, _ = sources
    _import(monkeypatch, capsys, folder)
    path = str(folder / "store")
    code, out, _ = cli(monkeypatch, capsys, "info", path)
    assert code == 0 and "status       complete" in out and "rows         1,033 in 17 chunks" in out
    assert "objects      1 shard(s) per array of 1,088 rows (format 2, Zarr v3 sharding)" in out
    on_disk = float(re.search(r"on disk +([0-9.]+) KiB", out).group(1))
    assert 49 < on_disk < 64  # 1,088 padded rows x (8 x 4 + 16) bytes, small indexes, metadata
    code, out, _ = cli(monkeypatch, capsys, "info", path, "--json")
    assert code == 0 and json.loads(out)["n_rows"] == 1033
    code, out, _ = cli(monkeypatch, capsys, "verify", path)
    assert code == 0 and out.startswith("ok:") and "68 chunks verified" in out
    # flip one byte of one chunk: verify names it and exits 2
    flip_chunk_byte(folder / "store", "acts/resid", 3)
    code, out, err = cli(monkeypatch, capsys, "verify", path)
    assert code == 2 and err.strip().splitlines() == [
        f"error: store {path} is damaged: 1 of 68 chunks are bad "
        "(first: acts/resid chunk 3 does not match its checksum); recreate it with --overwrite"]


class SimulatedCrash(Exception):
    pass


def test_crash_then_resume_is_identical(monkeypatch, capsys, sources):
    """A crash in pass 1 and one in pass 2 (simulated in-process), then --resume: same bytes."""
    folder, _ = sources
    assert _import(monkeypatch, capsys, folder, "--shuffle-memory", "4KiB")[0] == 0
    want = {p: zarr.open_group(str(folder / "store"))[p][:]
            for p in ("acts/resid", "seq_index", "position")}
    monkeypatch.setattr("cache_acts.importer.READ_BYTES", 32 * 100)  # 100 rows per step

    real_chunk, calls = engine.write_chunk, {"n": 0}

    def crash_in_pass_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise SimulatedCrash
        return real_chunk(*args, **kwargs)

    real_to_records = engine.to_records

    def crash_in_pass_1(batch, rec, start):
        if batch.cursor > 500:
            raise SimulatedCrash
        return real_to_records(batch, rec, start)

    monkeypatch.setattr(engine, "to_records", crash_in_pass_1)
    with pytest.raises(SimulatedCrash):
        _import(monkeypatch, capsys, folder, "--overwrite", "--shuffle-memory", "4KiB")
    with pytest.raises(UserError):  # no zarr.json yet: not a store
        open_store(folder / "store")
    monkeypatch.setattr(engine, "to_records", real_to_records)
    monkeypatch.setattr(engine, "write_chunk", crash_in_pass_2)
    with pytest.raises(SimulatedCrash):
        _import(monkeypatch, capsys, folder, "--resume", "--shuffle-memory", "4KiB")
    code, out, _ = cli(monkeypatch, capsys, "info", str(folder / "store"))
    assert "INCOMPLETE" in out
    monkeypatch.setattr(engine, "write_chunk", real_chunk)
    code, _, err = _import(monkeypatch, capsys, folder, "--resume")
    assert code == 0, err
    g = zarr.open_group(str(folder / "store"))
    assert all(np.array_equal(g[p][:], want[p]) for p in want)
    assert not (folder / "store" / ".cache-acts-tmp").exists()
    assert cli(monkeypatch, capsys, "verify", str(folder / "store"))[0] == 0


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["missing.npy"], "cannot read {d}/missing.npy: no such file"),
        ("3d", ["x.npy"], "has shape (2, 3, 4); activations must be 2-D"),
        ("int", ["x.npy"], "holds int64 values; activations must be floating point"),
        ("wide", ["a.npy", "x.npy"], "has d_in 9 but"),
        ("two", ["x.safetensors"], "holds 2 tensors (p, q); choose one with --key"),
        ("two", ["x.safetensors", "--key", "r"], "has no tensor 'r'; it holds p, q"),
        (None, ["a.npy", "--dtype", "float64"], "unknown dtype 'float64'"),
        (None, ["a.npy", "--compression", "lz4"], "unknown --compression 'lz4'"),
        (None, ["a.npy", "--resume", "--overwrite"], "contradict each other"),
    ],
)
def test_bad_import_input(monkeypatch, capsys, sources, setup, args, message):
    folder, _ = sources
    x = {"3d": np.zeros((2, 3, 4), np.float32), "int": np.zeros((5, 8), np.int64),
         "wide": np.zeros((5, 9), np.float32)}.get(setup)
    if x is not None:
        np.save(folder / "x.npy", x)
    if setup == "two":
        save_file({"p": torch.zeros(3, 8), "q": torch.zeros(3, 8)}, str(folder / "x.safetensors"))
    files = [str(folder / a) if a.endswith((".npy", ".safetensors")) else a for a in args]
    code, _, err = cli(monkeypatch, capsys, "import", *files, "--hook", "h", "--out",
                       str(folder / "s"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert message.format(d=folder) in lines[0]
    assert not (folder / "s").exists()


def test_existing_out_needs_a_flag(monkeypatch, capsys, sources, tmp_path):
    folder, _ = sources
    _import(monkeypatch, capsys, folder)
    code, _, err = _import(monkeypatch, capsys, folder)
    assert code == 2 and "already exists; pass --resume" in err
    code, _, err = _import(monkeypatch, capsys, folder, "--resume")
    assert code == 0 and "already complete" in err
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = cli(monkeypatch, capsys, "import", str(folder / "a.npy"), "--hook", "h",
                       "--out", str(other), "--overwrite")
    assert code == 2 and "refusing to overwrite" in err and (other / "notes.txt").exists()


@pytest.mark.parametrize("where", ["cache_acts.shuffle.BucketFiles.flush",  # pass 1
                                   "cache_acts.writer.RawShards.put"])  # pass 2, a writer thread
def test_disk_full_is_one_line_and_resumable(monkeypatch, capsys, sources, where):
    folder, _ = sources

    def full(self, *args):
        raise OSError(28, "No space left on device", "chunk file")

    with monkeypatch.context() as patch:
        patch.setattr(where, full)
        code, _, err = _import(monkeypatch, capsys, folder)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the disk is full") and "--resume" in err
    assert _import(monkeypatch, capsys, folder, "--resume")[0] == 0
    assert cli(monkeypatch, capsys, "verify", str(folder / "store"))[0] == 0


def test_pass_2_deletes_each_bucket_file_only_after_its_last_chunk_is_committed(
        monkeypatch, capsys, sources):
    folder, _ = sources
    removed: dict[int, int] = {}  # bucket -> chunks committed when it was deleted
    real_remove = BucketFiles.remove

    def remove(self, bucket):
        state = RunState.load(self.folder)
        (sizes,) = state.bucket_bytes  # one rank
        last = last_chunk_of_buckets([b // self.rec.itemsize for b in sizes], 64)
        assert last[bucket] < state.chunks_done[0]  # every chunk holding its rows is committed
        assert self.path(bucket).exists()
        removed[bucket] = state.chunks_done[0]
        real_remove(self, bucket)

    monkeypatch.setattr(BucketFiles, "remove", remove)
    assert _import(monkeypatch, capsys, folder, "--shard-rows", "128")[0] == 0
    assert len(removed) > 4  # many buckets (8 KiB budget), removed one by one as pass 2 went
    assert len(set(removed.values())) > 2
    assert cli(monkeypatch, capsys, "verify", str(folder / "store"))[0] == 0
