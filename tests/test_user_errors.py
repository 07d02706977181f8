"""User errors in both CLIs end in one line `error: ...` on stderr, exit code 2, no traceback,
and nothing half-written: bad option values and TOML types, unusable --out paths, a full disk,
damaged stores, undecodable datasets, unsafe hook names, Ctrl-C at start-up, damaged SAE files."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke
from synthetic import make_sparse_data, write_synthetic_store

import cache_acts.cli
import train_sae.cli
from shared.atomic import atomic_write
from shared.errors import UserError
from train_sae.dictionaries import build_sae
from train_sae.training.saving import (
    CFG_FILENAME,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    load_sae,
    read_log10_density,
    save_sae,
)


def one_line_error(result: tuple[int, str, str], message: str) -> None:
    """The contract for a CLI result (code, stdout, stderr): exit 2, one `error:` line on stderr
    holding `message`, no traceback."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def cache(monkeypatch, capsys, *args):
    return invoke(cache_acts.cli.main, "cache-acts", monkeypatch, capsys, *args)


def train(monkeypatch, capsys, *args):
    return invoke(train_sae.cli.main, "train-sae", monkeypatch, capsys, *args)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = make_sparse_data(512, 8, 16, 2, seed=0)
    path = tmp_path_factory.mktemp("s") / "store"
    write_synthetic_store(path, x, chunk_rows=128)
    return path


@pytest.fixture(scope="module")
def npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    np.save(path, np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32))
    return path


def sweep_args(store: Path, out: Path) -> list:
    return ["sweep", "--store", store, "--out", out, "--batch-size", 128, "--device", "cpu"]


def run_args(model: Path, dataset: Path, out: Path, *extra) -> list:
    return ["run", "--model", f"random:{model}", "--dataset", dataset, "--context-size", 8,
            "--hook", "blocks.0.hook_resid_post", "--device", "cpu", "--out", out, *extra]


# 1. option values of the wrong type ------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--arch", "topk", "--width", "abc", "--k", 2], "--width takes whole numbers, got 'abc'"),
    (["--arch", "topk", "--width", "64.5", "--k", 2], "--width takes whole numbers, got 64.5"),
    (["--arch", "topk", "--width", 8, "--k", 2, "--lr", "abc"], "--lr takes finite numbers"),
    (["--arch", "relu", "--width", 8, "--l1", "abc"], "--l1 takes finite numbers, got 'abc'"),
    (["--arch", "topk", "--expansion", "abc", "--k", 2], "--expansion takes finite numbers"),
    (["--arch", "relu", "--width", 8, "--resample-at", "abc"], "--resample-at takes finite"),
    (["--arch", "jumprelu", "--width", 8, "--param", "bandwidth=abc"],
     "--param bandwidth takes finite numbers, got 'abc'"),
    (["--arch", "topk", "--width", 8, "--k", "3.5"], "--k takes whole numbers, got 3.5"),
    (["--arch", "relu", "--width", 8, "--resample", "maybe"], "--resample takes on/off values"),
])
def test_bad_option_values(store, tmp_path, monkeypatch, capsys, extra, message):
    out = tmp_path / "out"
    one_line_error(train(monkeypatch, capsys, *sweep_args(store, out), *extra), message)
    assert not out.exists()


@pytest.mark.parametrize("toml, message", [
    ('[[member]]\narch = "topk"\nwidth = "big"\nk = 2', "member 1: 'width' takes whole numbers"),
    ('[[member]]\narch = "topk"\nwidth = 8\nk = 2.5', "member 1: 'k' takes whole numbers, got 2.5"),
    ('[[member]]\narch = "relu"\nwidth = 8\nl1_coefficient = "x"',
     "member 1: 'l1_coefficient' takes finite numbers, got 'x'"),
    ('[[member]]\narch = "relu"\nwidth = 8\nresample_at = 0.5', "'resample_at' takes a list"),
    ("member = [1, 2]", "'member' must be a list of tables"),
    ('[member]\narch = "topk"', "'member' must be a list of tables"),
    ('defaults = 3\n[[member]]\narch = "topk"', "'defaults' must be a table"),
])
def test_bad_toml_types(store, tmp_path, monkeypatch, capsys, toml, message):
    config, out = tmp_path / "sweep.toml", tmp_path / "out"
    config.write_text(toml + "\n")
    result = train(monkeypatch, capsys, *sweep_args(store, out), "--config", config)
    one_line_error(result, message)
    assert not out.exists()


# 2. an --out that cannot be written ------------------------------------------------------------

def _outs(kind: str, tmp_path: Path, monkeypatch) -> Path:
    """An --out below a regular file, or in a folder the user may not write to (simulated:
    the tests may run as root, whom a chmod does not stop)."""
    if kind == "below a file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "sub"
    ro = tmp_path / "ro"
    ro.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and access(p, mode))
    return ro / "sub"


@pytest.mark.parametrize("kind, message", [("below a file", "afile is a file, not a folder"),
                                           ("read-only", "is not writable")])
def test_unusable_out(store, npy, tmp_path, monkeypatch, capsys, tiny_model_json_with_tokenizer,
                      tiny_jsonl, kind, message):
    out = _outs(kind, tmp_path, monkeypatch)
    for result in (
        cache(monkeypatch, capsys, *run_args(tiny_model_json_with_tokenizer, tiny_jsonl, out)),
        cache(monkeypatch, capsys, "import", npy, "--hook", "h", "--out", out),
        train(monkeypatch, capsys, *sweep_args(store, out), "--arch", "topk", "--width", 8,
              "--k", 2),
    ):
        one_line_error(result, message)
        assert "--out" in result[2]
    assert not os.path.lexists(out)


def test_permission_error_deep_inside_is_one_line(npy, tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr("cache_acts.importer.import_files", denied)
    result = cache(monkeypatch, capsys, "import", npy, "--hook", "h", "--out", tmp_path / "o")
    one_line_error(result, f"cannot use {tmp_path / 'x'}: Permission denied")


# 3. a full disk -------------------------------------------------------------------------------

def _full(partial: Path) -> None:
    partial.write_bytes(b"half")
    raise OSError(errno.ENOSPC, "No space left on device", str(partial))


def test_atomic_write_leaves_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write(path, _full, durable=True)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]


def test_disk_full_saving_weights_keeps_the_old_ones(tmp_path, monkeypatch):
    sae = build_sae("topk", 4, 8, {"k": 2}, 0)
    kwargs = dict(hook="h", model="m", d_in=4, extra_cfg={}, sparsity=torch.zeros(8),
                  input_scale=1.0)
    save_sae(sae, tmp_path, **kwargs)
    before = (tmp_path / WEIGHTS_FILENAME).read_bytes()
    monkeypatch.setattr("train_sae.training.saving.write_safetensors", lambda p, tensors: _full(Path(p)))
    with pytest.raises(OSError):
        save_sae(build_sae("topk", 4, 8, {"k": 2}, 1), tmp_path, **kwargs)
    assert (tmp_path / WEIGHTS_FILENAME).read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("command, patch, hint", [
    (["report", "."], "train_sae.evaluation.report.write_report", "free space, then rerun the command"),
    (["sweep", "--store", "s", "--out", "o", "--arch", "topk", "--width", 8],
     "train_sae.cli.prepare", "free space or choose another --out, then rerun with --resume"),
])
def test_disk_full_hint_names_only_options_the_command_has(monkeypatch, capsys, tmp_path,
                                                           command, patch, hint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(patch, lambda *a, **k: _full(tmp_path / "f"))
    one_line_error(train(monkeypatch, capsys, *command), hint)


# 4. damaged stores ----------------------------------------------------------------------------

def _break_zstd_frame(chunk: Path) -> None:
    chunk.write_bytes(b"\0\0\0\0" + chunk.read_bytes()[4:])  # no zstd magic number: undecodable


@pytest.mark.parametrize("compression, damage, message", [
    ("none", lambda c: c.write_bytes(c.read_bytes()[:100]), "acts/h chunk 1 cannot be read"),
    ("none", lambda c: c.write_bytes(c.read_bytes() + b"more"), "acts/h chunk 1 cannot be read"),
    ("zstd", _break_zstd_frame, "acts/h chunk 1 cannot be read (Zstd decompression error"),
    ("none", lambda c: (c.parents[2] / "zarr.json").write_text("garbage"),
     "array acts/h cannot be opened"),
])
def test_verify_names_the_damaged_array_and_chunk(npy, tmp_path, monkeypatch, capsys,
                                                  compression, damage, message):
    out = tmp_path / "store"
    code, _, err = cache(monkeypatch, capsys, "import", npy, "--hook", "h", "--out", out,
                         "--chunk-rows", 64, "--shard-rows", 64, "--compression", compression)
    assert code == 0, err
    damage(out / "acts" / "h" / "c" / "1" / "0")  # the shard holding (only) chunk 1
    one_line_error(cache(monkeypatch, capsys, "verify", out), message)


# 5, 6. datasets that cannot be read, and the BOS flag -------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"t4 t5 \xff t6", "dataset file {f} is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "t4"}\n{"text": "t5 \xff"}\n', "line 2 of {f} is not UTF-8 text"),
    ("bad.json", b'[{"text": "t4 \xff"}]', "dataset file {f} is not UTF-8 text"),
    ("null.jsonl", b'{"tokens": [4, 5]}\n{"tokens": [4, null, 5]}\n',
     "row 1 of {f}: column 'tokens' holds null values (None); token ids must be whole numbers"),
    ("float.jsonl", b'{"tokens": [4, 5.5]}\n', "column 'tokens' holds float values (5.5)"),
])
def test_unreadable_dataset_rows(tmp_path, monkeypatch, capsys, tiny_model_json_with_tokenizer,
                                 name, content, message):
    data = tmp_path / name
    data.write_bytes(content)
    tokens = ["--token-column", "tokens"] if b"tokens" in content else []
    out = tmp_path / "out"
    result = cache(monkeypatch, capsys,
                         *run_args(tiny_model_json_with_tokenizer, data, out, *tokens))
    one_line_error(result, message.format(f=data))
    assert not out.exists()


def test_bos_error_names_the_real_flag(tmp_path, monkeypatch, capsys, tiny_model_json, tiny_jsonl):
    out = tmp_path / "out"
    result = cache(monkeypatch, capsys,
                         *run_args(tiny_model_json, tiny_jsonl, out, "--token-column", "tokens"))
    one_line_error(result, "pass --no-bos")
    assert "prepend-bos" not in result[2] and not out.exists()


# 7. hook names that cannot be store paths ---------------------------------------------------------

@pytest.mark.parametrize("hook", ["..", ".", "", "a\\b", "/blocks.0.hook_resid_post",
                                  "blocks.0.hook_resid_post/", "x/../y", "__x"])
def test_unsafe_hook_names(npy, tmp_path, monkeypatch, capsys, tiny_model_json_with_tokenizer,
                           tiny_jsonl, hook):
    out = tmp_path / "out"
    args = run_args(tiny_model_json_with_tokenizer, tiny_jsonl, out)
    args[args.index("blocks.0.hook_resid_post")] = hook
    one_line_error(cache(monkeypatch, capsys, *args), "cannot name a stored array")
    one_line_error(cache(monkeypatch, capsys, "import", npy, "--hook", hook, "--out", out),
                   "cannot name a stored array")
    assert not out.exists()


# 8. Ctrl-C while starting up -------------------------------------------------------------------

def test_ctrl_c_while_loading_the_model(tmp_path, monkeypatch, capsys,
                                        tiny_model_json_with_tokenizer, tiny_jsonl):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("shared.models.load_model", interrupted)
    monkeypatch.setattr("cache_acts.run.load_model", interrupted)
    out = tmp_path / "out"
    result = cache(monkeypatch, capsys,
                         *run_args(tiny_model_json_with_tokenizer, tiny_jsonl, out))
    one_line_error(result, "interrupted")
    assert not out.exists()


# 9. a damaged SAE folder -----------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    (CFG_FILENAME, b"{not json"), (CFG_FILENAME, b"\xff\xfe"), (CFG_FILENAME, b"[1, 2]"),
    (WEIGHTS_FILENAME, b"garbage"), (SPARSITY_FILENAME, b"garbage"),
])
def test_damaged_sae_files_are_named(tmp_path, name, content):
    save_sae(build_sae("topk", 4, 8, {"k": 2}, 0), tmp_path, hook="h", model="m", d_in=4,
             extra_cfg={}, sparsity=torch.zeros(8), input_scale=1.0)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=re.escape(str(tmp_path / name))):
        load_sae(tmp_path) if name != SPARSITY_FILENAME else read_log10_density(tmp_path)


# 10. seeds outside what the generators take --------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_the_generators_cannot_take_is_one_line(monkeypatch, capsys, tmp_path, store, npy,
                                                       tiny_model_json_with_tokenizer, tiny_jsonl,
                                                       seed):
    message = f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}"
    one_line_error(train(monkeypatch, capsys, *sweep_args(store, tmp_path / "o"), "--arch",
                         "topk", "--width", 8, "--k", 2, "--seed", seed), message)
    one_line_error(cache(monkeypatch, capsys, "import", npy, "--hook", "h", "--out",
                         tmp_path / "i", "--seed", seed), message)
    one_line_error(cache(monkeypatch, capsys, *run_args(tiny_model_json_with_tokenizer, tiny_jsonl,
                                                        tmp_path / "r", "--seed", seed)), message)
    assert not any((tmp_path / name).exists() for name in ("o", "i", "r"))
