"""Fault injection in both stages (issue: faults). Five promises, each checked byte for byte
against an uninterrupted run:

1. a full disk (a real tmpfs filled to leave a chosen amount of space, or filled at one exact
   moment) is one `error:` line, exit 2, nothing that looks complete and no stray `*.tmp`; after
   making space, `--resume` finishes with the same bytes;
2. `kill -9` of real `.venv/bin/cache-acts` / `.venv/bin/train-sae` processes after seeded random
   delays, then `--resume` until complete, gives the same bytes;
3. a flipped byte, a truncated, extended, deleted or swapped chunk file is found by
   `cache-acts verify` and by `train-sae sweep` (one line, exit 2, never 0);
4. two writers on one --out: exactly one proceeds, the other is refused with one line naming it;
5. inputs changed under --resume are refused with one line naming them; restored, the run
   finishes identically.

The fast part uses small stores and in-process CLIs where it can; `-m slow` runs many more
random points (`bash pipelines/test_faults.sh`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from conftest import invoke, swap_chunk_bytes
from synthetic import make_sparse_data, write_synthetic_store

import cache_acts.cli
import cache_acts.importer  # noqa: F401 - imported here (the CLI imports them lazily) so that
import cache_acts.run  # noqa: F401 - reference runs time the work, not the imports
import train_sae.cli
from cache_acts.state import STATE_FILE, TMP_DIR
from shared.fingerprint import digests
from shared.lock import LOCK_FILE
from shared.store import open_store

ROOT = Path(__file__).parents[1]
BIN = ROOT / ".venv" / "bin"
CTX = 8
HOOK = "blocks.0.hook_resid_post"
TINY = dict(n_layers=1, d_model=16, d_mlp=32, n_heads=2, d_head=8, d_vocab=50, n_ctx=16,
            act_fn="gelu", normalization_type="LN", seed=0)
ARRAYS = [f"acts/{HOOK}", "token_ids", "seq_index", "position"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DISK_FULL = "the disk is full"


# --- inputs and references ----------------------------------------------------------------------

def write_tokens(path: Path, n_seq: int, seed: int) -> None:
    ids = np.random.default_rng(seed).integers(0, 50, size=(n_seq, CTX))
    pq.write_table(pa.table({"ids": ids.tolist()}), path)


def write_inputs(root: Path) -> Path:
    """Model config, datasets and stores every test reads (copied where a test changes them)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "m.json").write_text(json.dumps(TINY))
    write_tokens(root / "tok.parquet", 100, seed=0)  # 800 rows: small, in-process runs
    write_tokens(root / "big.parquet", 3000, seed=1)  # 24,000 rows: a few seconds, subprocesses
    x = np.random.default_rng(2).standard_normal((800, 16)).astype(np.float32)
    np.save(root / "acts.npy", x)
    small, _ = make_sparse_data(1024, 8, 16, 2, seed=0)
    write_synthetic_store(root / "train-small", small, hook="h", chunk_rows=256)
    big, _ = make_sparse_data(16384, 16, 32, 3, seed=0)
    write_synthetic_store(root / "train-big", big, hook="h", chunk_rows=1024)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("faults"))


def run_args(root: Path, out: Path, *extra, big: bool = False) -> list[str]:
    """`cache-acts run` of the tiny model: 800 rows in 25 chunks, 4 per shard (big: 24,000 in
    375)."""
    data, batch, chunk, memory = (("big.parquet", 4, 128, "256KiB") if big
                                  else ("tok.parquet", 2, 32, "32KiB"))
    return ["run", "--model", f"random:{root / 'm.json'}", "--dataset", str(root / data),
            "--token-column", "ids", "--context-size", str(CTX), "--no-bos", "--hook", HOOK,
            "--batch-size", str(batch), "--chunk-rows", str(chunk), "--shard-rows", str(4 * chunk),
            "--shuffle-memory", memory,
            "--device", "cpu", "--out", str(out), *map(str, extra)]


def import_args(root: Path, out: Path, *extra) -> list[str]:
    return ["import", str(root / "acts.npy"), "--hook", "h", "--chunk-rows", "32",
            "--shard-rows", "128", "--shuffle-memory", "32KiB", "--out", str(out),
            *map(str, extra)]


def sweep_args(store: Path, out: Path, *extra, big: bool = False) -> list[str]:
    """A topk (+ relu with resampling, big) sweep with checkpoints, every member logging."""
    grid = (["--batch-size", "32", "--arch", "topk,relu", "--width", "64", "--k", "4,8",
             "--l1", "1", "--checkpoint-every", "16", "--log-every", "8"] if big else
            ["--batch-size", "64", "--arch", "topk", "--width", "16", "--k", "2,4",
             "--checkpoint-every", "4", "--log-every", "2"])
    return ["sweep", "--store", str(store), "--out", str(out), "--device", "cpu", *grid,
            *map(str, extra)]


def cache(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """`cache-acts ARGV` in-process; an escaping exception reads as exit -1 with its traceback."""
    return _in_process(cache_acts.cli.main, "cache-acts", monkeypatch, capsys, argv)


def train(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    return _in_process(train_sae.cli.main, "train-sae", monkeypatch, capsys, argv)


def _in_process(main, prog, monkeypatch, capsys, argv) -> tuple[int, str, str]:
    try:
        return invoke(main, prog, monkeypatch, capsys, *argv)
    except Exception:  # noqa: BLE001 - a traceback the user would see
        out = capsys.readouterr()
        return -1, out.out, out.err + traceback.format_exc()


REF_ARGS = {  # name -> (tool, inputs root, out -> argv)
    "run": ("cache", lambda root, out: run_args(root, out)),
    "run-big": ("cache", lambda root, out: run_args(root, out, big=True)),
    "import": ("cache", lambda root, out: import_args(root, out)),
    "sweep": ("train", lambda root, out: sweep_args(root / "train-small", out)),
    "sweep-big": ("train", lambda root, out: sweep_args(root / "train-big", out, big=True)),
}
_REFS: dict[str, tuple[Path, float]] = {}  # name -> (output, seconds it took)


@pytest.fixture
def refs(inputs, monkeypatch, capsys):
    """refs(name) -> the output of an uninterrupted run of REF_ARGS[name], built once per
    module (in-process); `ref_seconds(name)` says how long it took."""

    def get(name: str) -> Path:
        out = inputs / "ref" / name
        if name not in _REFS or _REFS[name][0] != out:
            tool, argv_for = REF_ARGS[name]
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            code, _, err = (cache if tool == "cache" else train)(monkeypatch, capsys,
                                                                  *argv_for(inputs, out))
            assert code == 0, err
            _REFS[name] = (out, time.perf_counter() - t0)
        return out

    return get


def ref_seconds(name: str) -> float:
    return _REFS[name][1]


# --- checks ---------------------------------------------------------------------------------------

def one_error(code: int, err: str, *words: str) -> str:
    """Exit 2, exactly one `error:` line (the last line), no traceback; the line holds `words`."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err}"
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), leaving out the lock."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def manifest_of(store: Path) -> dict:
    if not (store / "zarr.json").exists():
        return {}
    return dict(zarr.open_group(str(store), mode="r").attrs.get("manifest", {}))


def without_paths(manifest: dict) -> dict:
    """The manifest less the entries that hold input paths (a copied dataset or model config
    has the same content under another name)."""
    m = {k: v for k, v in manifest.items() if k not in ("dataset", "source_files")}
    for key in ("fingerprints", "settings"):  # fingerprints by digest (they also say where)
        m[key] = digests(m.get(key))
    source = dict(m.get("model_info", {}).get("source", {}))
    source.pop("path", None)
    if source:
        m["model_info"] = {**m["model_info"], "source": source}
    return m


def assert_same_store(ref: Path, out: Path) -> None:
    """Complete, every array equal element for element (read through zarr), every chunk file
    equal byte for byte, the same checksums and statistics, and no file the reference lacks."""
    ma, mb = manifest_of(ref), manifest_of(out)
    assert ma["complete"] is True and mb["complete"] is True
    ga, gb = zarr.open_group(str(ref), mode="r"), zarr.open_group(str(out), mode="r")
    for path in ma["checksums"]:
        a, b = ga[path][:], gb[path][:]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    assert mb["checksums"] == ma["checksums"] and mb["stats"] == ma["stats"]
    assert without_paths(mb) == without_paths(ma)
    fa, fb = files(ref), files(out)
    assert sorted(fb) == sorted(fa)  # no temporary, partial or foreign file left
    assert [k for k in fa if k != "zarr.json" and fa[k] != fb[k]] == []


def assert_same_sweep(ref: Path, out: Path) -> None:
    """Complete, and every member's files (weights, sparsity, cfg, metrics.jsonl, metrics.json)
    equal byte for byte; no checkpoint or temporary left."""
    assert json.loads((out / "sweep.json").read_text())["status"] == "complete"
    fa, fb = files(ref), files(out)
    assert sorted(fb) == sorted(fa)
    weights = [k for k in fa if k.endswith("sae_weights.safetensors")]
    assert len(weights) >= 2
    for k in fa:
        if k != "sweep.json":  # holds the store's path
            assert fb[k] == fa[k], k


def stray_temporaries(folder: Path) -> list[str]:
    """`*.tmp` anywhere, and zarr/cache-acts `*.partial` files outside the work folder."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")
            or (p.name.endswith(".partial") and TMP_DIR not in p.parts)]


def run_state(store: Path) -> dict | None:
    try:
        return json.loads((store / TMP_DIR / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def assert_store_not_complete(store: Path, monkeypatch, capsys) -> None:
    """Nothing reads an interrupted store as complete: not its manifest, not `cache-acts
    verify`, not `train-sae` (one line each, saying it is not complete)."""
    assert manifest_of(store).get("complete") is not True
    code, _, err = cache(monkeypatch, capsys, "verify", store)
    line = one_error(code, err)
    assert "is not complete" in line or "no activation store" in line, line
    code, _, err = train(monkeypatch, capsys, "sweep", "--store", store, "--out",
                         store.parent / "probe-sweep", "--arch", "topk", "--width", 16)
    line = one_error(code, err)
    assert "is not complete" in line or "no activation store" in line, line
    assert not (store.parent / "probe-sweep").exists()


def sweep_status(out: Path) -> str | None:
    try:
        return json.loads((out / "sweep.json").read_text())["status"]
    except (OSError, ValueError):
        return None


def fill_before(monkeypatch, disk, target: str, when=lambda *a, **k: True) -> list[int]:
    """Fill `disk` right before `target` (a dotted function path) runs and `when(args)` holds;
    returns a list that gets one entry per time it did."""
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)
    hits: list[int] = []

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            disk.fill()
            hits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, wrapper)
    return hits


# --- 1. a full disk ---------------------------------------------------------------------------

def disk_full_then_resume(monkeypatch, capsys, argv_for, disk, ref: Path, tmp_path: Path,
                          moved: bool) -> dict | None:
    """Run `cache-acts` on the full `disk`: one line, exit 2, incomplete, no stray .tmp; then
    make space (or copy the folder to a big disk) and --resume: identical to `ref`. Returns the
    resume state the failure left."""
    out = disk.path / "store"
    code, _, err = cache(monkeypatch, capsys, *argv_for(out))
    one_error(code, err, DISK_FULL, "--resume")
    state = run_state(out)
    if out.exists():
        assert_store_not_complete(out, monkeypatch, capsys)
        assert stray_temporaries(out) == []
    if moved:
        big = tmp_path / "moved"
        if out.exists():
            shutil.copytree(out, big)
        out = big
    else:
        disk.make_space()
    code, _, err = cache(monkeypatch, capsys, *argv_for(out), "--resume")
    assert code == 0, err
    assert_same_store(ref, out)
    return state


CACHE_POINTS = [  # (command, KiB left free or "manifest", where the failure must land, moved)
    ("run", 70, "pass 1", False),
    ("run", 200, "pass 2", False),
    ("run", "manifest", "manifest", True),
    ("import", 180, "pass 2", True),
]


@pytest.mark.parametrize(("command", "free", "where", "moved"), CACHE_POINTS)
def test_disk_full_in_cache_acts(inputs, refs, small_disk, tmp_path, monkeypatch, capsys,
                                 command, free, where, moved):
    ref = refs(command)  # built first: filling the disk below must not hit the reference run
    if free == "manifest":  # the final manifest, the step that makes the store complete
        hits = fill_before(monkeypatch, small_disk, "cache_acts.engine.write_manifest",
                           lambda group, m: m.complete)
    else:
        small_disk.leave_free(free * 1024)
    build = REF_ARGS[command][1]
    state = disk_full_then_resume(monkeypatch, capsys, lambda out: build(inputs, out),
                                  small_disk, ref, tmp_path, moved)
    assert state is not None
    n_chunks = 25
    if where == "pass 1":
        assert state["phase"] == "scatter" and 0 < state["rows_done"] < 800, state
    elif where == "pass 2":
        assert state["phase"] == "gather" and 0 < state["chunks_done"][0] < n_chunks, state
    else:
        assert hits and state["phase"] == "gather" and state["chunks_done"] == [n_chunks]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "import"])
@pytest.mark.parametrize("seed", range(10))
def test_disk_full_in_cache_acts_at_random_sizes(inputs, refs, small_disk, tmp_path,
                                                 monkeypatch, capsys, command, seed):
    """Random free space from nothing to just below what the run needs, in place or moved."""
    rng = random.Random(f"{command}-{seed}")
    small_disk.leave_free(rng.randrange(0, 210) * 1024)  # either run needs about 218 KiB
    build = REF_ARGS[command][1]
    disk_full_then_resume(monkeypatch, capsys, lambda out: build(inputs, out), small_disk,
                          refs(command), tmp_path, moved=rng.random() < 0.3)


def test_disk_full_before_the_first_manifest(inputs, refs, small_disk, tmp_path, monkeypatch,
                                             capsys):
    """The disk fills as pass 2 writes the store's first (incomplete) manifest: --resume
    finishes it identically, verify calls it not complete, --overwrite replaces it."""
    hits = fill_before(monkeypatch, small_disk, "shared.store.write_manifest",
                       lambda group, m: not m.complete)
    out = small_disk.path / "store"
    code, _, err = cache(monkeypatch, capsys, *run_args(inputs, out))
    one_error(code, err, DISK_FULL, "--resume")
    assert hits and run_state(out)["phase"] == "gather"
    monkeypatch.undo()
    small_disk.make_space()
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    code, _, err = cache(monkeypatch, capsys, *run_args(inputs, out, "--resume"))
    assert code == 0, err
    assert_same_store(refs("run"), out)
    assert_store_not_complete(copy, monkeypatch, capsys)
    code, _, err = cache(monkeypatch, capsys, *run_args(inputs, copy, "--overwrite"))
    assert code == 0, err
    assert_same_store(refs("run"), copy)


# (KiB left free, or the function before which the disk fills up). Regressions: a checkpoint
# (torch.save) and weights (safetensors) on a full disk used to raise RuntimeError /
# SafetensorError and show a traceback; after a full disk before sweep.json, --resume (as the
# error line says) used to refuse with "holds no sweep to resume".
TRAIN_POINTS = [
    pytest.param(4, id="sweep-json"),
    pytest.param(10, id="metrics-log"),
    pytest.param(36, id="checkpoint-by-size"),
    pytest.param("train_sae.training.trainer.save_checkpoint", id="checkpoint"),
    pytest.param("train_sae.training.trainer.save_member", id="final-weights"),
    pytest.param("train_sae.training.trainer.mark_complete", id="final-sweep-json"),
]


def sweep_disk_full_then_resume(monkeypatch, capsys, inputs, disk, ref: Path) -> None:
    """`train-sae sweep` on the full `disk`: one line, exit 2, not complete, no stray .tmp;
    then make space and --resume: identical to `ref`."""
    out = disk.path / "sweep"
    argv = sweep_args(inputs / "train-small", out)
    code, _, err = train(monkeypatch, capsys, *argv)
    one_error(code, err, DISK_FULL, "--resume")
    assert sweep_status(out) != "complete"
    if out.exists():
        assert stray_temporaries(out) == []
    monkeypatch.undo()  # the real functions again
    disk.make_space()
    code, _, err = train(monkeypatch, capsys, *argv, "--resume")
    assert code == 0, err
    assert_same_sweep(ref, out)


@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_disk_full_in_train_sae(inputs, refs, small_disk, monkeypatch, capsys, point):
    ref = refs("sweep")
    if isinstance(point, str):
        hits = fill_before(monkeypatch, small_disk, point)
    else:
        small_disk.leave_free(point * 1024)
    sweep_disk_full_then_resume(monkeypatch, capsys, inputs, small_disk, ref)
    if isinstance(point, str):
        assert hits


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_disk_full_in_train_sae_at_random_sizes(inputs, refs, small_disk, monkeypatch, capsys,
                                                seed):
    """Random free space from nothing to just below what the whole sweep needs (most sizes
    land in a checkpoint, the largest write)."""
    ref = refs("sweep")
    small_disk.leave_free(random.Random(seed).randrange(0, 88) * 1024)
    sweep_disk_full_then_resume(monkeypatch, capsys, inputs, small_disk, ref)


@pytest.mark.parametrize("tool", ["cache", "train"])
def test_disk_full_at_the_lock_then_resume_in_the_same_process(inputs, small_disk, monkeypatch,
                                                               capsys, tool):
    """Not one byte free: taking the lock (writing who holds it) is the first write to fail.
    Regression: the lock's descriptor leaked, so later runs in the same process were refused
    as 'being written by another run'."""
    small_disk.fill()
    out = small_disk.path / "out"
    command, argv = ((cache, run_args(inputs, out)) if tool == "cache"
                     else (train, sweep_args(inputs / "train-small", out)))
    code, _, err = command(monkeypatch, capsys, *argv)
    one_error(code, err, DISK_FULL)
    small_disk.make_space()
    assert not (out / LOCK_FILE).exists()
    code, _, err = command(monkeypatch, capsys, *argv, "--resume")
    assert code == 0, err


# --- 2. kill -9 ---------------------------------------------------------------------------------

def lock_holder(out: Path) -> int | None:
    """The pid the lock file of `out` names (None while there is none or it is being written)."""
    try:
        return json.loads((out / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for_lock(out: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until `proc` holds the lock of `out` (it has started writing); False if it ended."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if lock_holder(out) == proc.pid:
            return True
        assert time.monotonic() - t0 < timeout, "the run never took its lock"
        time.sleep(0.005)
    return False


def start(tool: str, argv: list[str], log: Path) -> subprocess.Popen:
    """`.venv/bin/<tool> ARGV` as a real process (one torch thread, stderr to `log`)."""
    with open(log, "w") as f:
        return subprocess.Popen([str(BIN / tool), *argv], stdout=subprocess.DEVNULL, stderr=f,
                                cwd=ROOT, env=ENV)


def run_and_kill(tool: str, argv: list[str], out: Path, delay: float, log: Path,
                 anchor=None) -> bool:
    """Start the tool; `delay` seconds after it took the lock of `out` (and `anchor()` holds,
    if given), SIGKILL it. True if it was killed, False if it had already finished (with
    exit code 0)."""
    proc = start(tool, argv, log)
    if wait_for_lock(out, proc):
        while anchor is not None and not anchor() and proc.poll() is None:
            time.sleep(0.002)
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    assert proc.returncode == 0, log.read_text()
    return False


def kill_cache_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed: int, kills: int,
                          spread: float, in_pass_2: bool) -> None:
    """`cache-acts run` (then `--resume`) killed up to `kills` times, each a random delay (up to
    `spread` x the reference run's time) after it took its lock (`in_pass_2`: every other kill
    counts from pass 2, which is short); every killed store is either incomplete (verify
    refuses it) or complete and whole; a last --resume finishes with the reference's bytes."""
    ref = refs("run-big")
    window = spread * ref_seconds("run-big")
    out = tmp_path / "store"
    rng = random.Random(seed)
    interrupted = 0
    for i in range(kills):
        if manifest_of(out).get("complete"):
            break
        argv = run_args(inputs, out, *(["--resume"] if i else []), big=True)
        if in_pass_2 and i % 2:
            delay, anchor = rng.uniform(0, window / 5), lambda: in_phase(out, "gather")
        else:
            delay, anchor = rng.uniform(0, window), None
        if not run_and_kill("cache-acts", argv, out, delay, tmp_path / "log", anchor):
            break
        if manifest_of(out).get("complete"):  # killed after the last step: it must be whole
            assert cache(monkeypatch, capsys, "verify", out)[0] == 0
        else:
            interrupted += 1
            assert_store_not_complete(out, monkeypatch, capsys)
    assert interrupted > 0, "no kill landed while the run was writing"
    code, _, err = cache(monkeypatch, capsys, *run_args(inputs, out, "--resume", big=True))
    assert code == 0, err
    assert_same_store(ref, out)


def in_phase(out: Path, phase: str) -> bool:
    return (run_state(out) or {}).get("phase") == phase


def kill_train_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed: int, kills: int,
                          spread: float, from_lock: bool = False) -> None:
    """`train-sae sweep --checkpoint-every 16` killed up to `kills` times, each a random delay
    after its training loop started (it prints "training ..."; a fresh process spends about a
    second between taking the lock and that; `from_lock`: count from the lock instead), resumed
    until complete: the same weights, sparsity and metrics as the reference sweep."""
    ref = refs("sweep-big")
    window = spread * ref_seconds("sweep-big")
    store, out, log = inputs / "train-big", tmp_path / "sweep", tmp_path / "log"
    rng = random.Random(seed)
    interrupted = 0
    for _ in range(kills):
        if sweep_status(out) == "complete":
            break
        argv = sweep_args(store, out, "--resume", big=True)  # also before sweep.json exists
        anchor = None if from_lock else lambda: "training " in log.read_text()
        if not run_and_kill("train-sae", argv, out, rng.uniform(0, window), log, anchor):
            break
        interrupted += sweep_status(out) != "complete"
    assert interrupted > 0, "no kill landed while the sweep was training"
    if sweep_status(out) != "complete":
        code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume", big=True))
        assert code == 0, err
    assert_same_sweep(ref, out)


def test_kill_9_cache_acts_then_resume(inputs, refs, tmp_path, monkeypatch, capsys):
    kill_cache_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed=0, kills=2,
                          spread=0.5, in_pass_2=True)


def test_kill_9_train_sae_then_resume(inputs, refs, tmp_path, monkeypatch, capsys):
    kill_train_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed=0, kills=2,
                          spread=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_kill_9_cache_acts_at_random_moments(inputs, refs, tmp_path, monkeypatch, capsys, seed):
    kill_cache_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed=seed, kills=6,
                          spread=0.7, in_pass_2=seed % 2 == 1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 6))
def test_kill_9_train_sae_at_random_moments(inputs, refs, tmp_path, monkeypatch, capsys, seed):
    kill_train_repeatedly(inputs, refs, tmp_path, monkeypatch, capsys, seed=seed, kills=6,
                          spread=0.8, from_lock=seed == 1)


# --- 3. damaged chunks ------------------------------------------------------------------------

DAMAGES = ["flip", "truncate", "append", "delete", "swap"]


def damage(store: Path, array: str, kind: str, rng: random.Random) -> list[int]:
    """Damage `array` in place at a random row chunk: flip a bit of the chunk's rows, swap its
    bytes with another chunk's of its shard, or truncate, extend or delete the shard holding it.
    Returns the chunks that are damaged, the one verify names first leading."""
    m = manifest_of(store)
    n, per = m["n_rows"] // m["chunk_rows"], m["shard_rows"] // m["chunk_rows"]
    c = rng.randrange(n) if kind != "swap" else rng.randrange(n - n % per)  # a shard of >1
    span = open_store(store).chunk_span(array, c)
    data = bytearray(span.file.read_bytes())
    in_shard = [i for i in range(n) if i // per == c // per]
    if kind == "flip":
        data[span.offset + rng.randrange(span.nbytes)] ^= 1 << rng.randrange(8)
        span.file.write_bytes(data)
        return [c]
    if kind == "swap":
        other = rng.choice([i for i in in_shard if i != c])
        swap_chunk_bytes(store, array, c, other)
        return sorted([c, other])
    if kind == "truncate":
        span.file.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "append":
        span.file.write_bytes(data + bytes(rng.randrange(1, 64)))
    else:
        span.file.unlink()
    return in_shard


def check_damage(store: Path, array: str, chunks: list[int], tmp_path: Path, monkeypatch,
                 capsys, train_too: bool) -> None:
    """verify names the array and (first) chunk in one line; train-sae refuses in one line
    naming the hook and a damaged chunk (it may read them in another order)."""
    code, _, err = cache(monkeypatch, capsys, "verify", store)
    one_error(code, err, "is damaged", f"{array} chunk {chunks[0]} ")
    if train_too:
        out = tmp_path / f"sweep-{array.replace('/', '-')}"
        code, _, err = train(monkeypatch, capsys, "sweep", "--store", store, "--out", out,
                             "--batch-size", 32, "--device", "cpu", "--arch", "topk",
                             "--width", 16, "--k", 2)
        line = one_error(code, err, HOOK)
        assert any(f"row chunk {c} " in line or f"/c/{c}/0 " in line for c in chunks), line
        assert sweep_status(out) != "complete"


def damage_cases(seeds) -> list:
    return [pytest.param(kind, seed, id=f"{kind}-{seed}") for seed in seeds for kind in DAMAGES]


def run_damage_case(refs, tmp_path, monkeypatch, capsys, kind: str, seed: int) -> None:
    """One damage in the activations (verify + train-sae) and one in a random other array
    (verify: train-sae does not read token ids, sequence indices or positions)."""
    ref = refs("run")
    rng = random.Random(f"{kind}-{seed}")
    for array, train_too in ((ARRAYS[0], True), (rng.choice(ARRAYS[1:]), False)):
        store = tmp_path / f"damaged-{array.replace('/', '-')}"
        shutil.copytree(ref, store)
        chunks = damage(store, array, kind, rng)
        check_damage(store, array, chunks, tmp_path, monkeypatch, capsys, train_too)


@pytest.mark.parametrize(("kind", "seed"), damage_cases([0]))
def test_damaged_chunk_is_one_line(refs, tmp_path, monkeypatch, capsys, kind, seed):
    run_damage_case(refs, tmp_path, monkeypatch, capsys, kind, seed)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed"), damage_cases(range(1, 6)))
def test_damaged_chunk_at_random_places(refs, tmp_path, monkeypatch, capsys, kind, seed):
    run_damage_case(refs, tmp_path, monkeypatch, capsys, kind, seed)


# --- 4. two writers at once ---------------------------------------------------------------------

PREWARMED = """
import pathlib, sys, time
tool, ready, go = sys.argv[1:4]
if tool == "cache-acts":
    import cache_acts.importer, cache_acts.inspect_store, cache_acts.run, shared.units
    from cache_acts.cli import main
else:
    from train_sae.cli import main
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.002)
sys.argv = [tool, *sys.argv[4:]]
main()
"""


class Prewarmed:
    """A real process running `<tool> ARGV` through the tool's own `main()`, started with its
    imports done and waiting for `go()`: a fresh process spends seconds importing torch, so
    this is what lets a second writer arrive while a small first one is still writing."""

    def __init__(self, tool: str, argv: list[str], folder: Path, name: str):
        self.ready, self.go_file = folder / f"{name}.ready", folder / f"{name}.go"
        self.log = folder / f"{name}.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                [str(BIN / "python"), "-c", PREWARMED, tool, str(self.ready), str(self.go_file),
                 *argv], stdout=subprocess.DEVNULL, stderr=f, cwd=ROOT, env=ENV)

    def wait_ready(self, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while not self.ready.exists():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - t0 < timeout
            time.sleep(0.01)

    def go(self) -> None:
        self.go_file.touch()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        return self.proc.wait(timeout), self.log.read_text()


def second_writer_is_refused(tool: str, argv: list[str], out: Path, tmp_path: Path) -> None:
    """Writer A starts; once it holds the lock of `out`, writer B (the same command) starts: B
    is refused in one line naming A's pid while A is still writing, and A finishes."""
    a, b = Prewarmed(tool, argv, tmp_path, "a"), Prewarmed(tool, argv, tmp_path, "b")
    a.wait_ready(), b.wait_ready()
    a.go()
    assert wait_for_lock(out, a.proc), a.log.read_text()
    b.go()
    code_b, err_b = b.finish()
    a_was_writing = a.proc.poll() is None
    code_a, err_a = a.finish()
    assert code_a == 0, err_a
    one_error(code_b, err_b, f"is being written by another run ({tool}, pid {a.proc.pid}")
    assert a_was_writing  # they overlapped: B was refused, not merely late


def test_two_cache_acts_writers(inputs, refs, tmp_path, monkeypatch, capsys):
    ref, out = refs("run-big"), tmp_path / "store"
    second_writer_is_refused("cache-acts", run_args(inputs, out, "--resume", big=True), out,
                             tmp_path)
    assert_same_store(ref, out)
    code, _, err = cache(monkeypatch, capsys, *run_args(inputs, out, "--resume", big=True))
    assert code == 0 and "already complete; nothing to do" in err
    assert_same_store(ref, out)


def test_two_train_sae_writers(inputs, refs, tmp_path, monkeypatch, capsys):
    ref, out = refs("sweep-big"), tmp_path / "sweep"
    store = inputs / "train-big"
    interrupt_sweep(monkeypatch, capsys, sweep_args(store, out, big=True), at_call=40)
    second_writer_is_refused("train-sae", sweep_args(store, out, "--resume", big=True), out,
                             tmp_path)
    assert_same_sweep(ref, out)


def interrupt_sweep(monkeypatch, capsys, argv: list[str], at_call: int) -> None:
    """Run a sweep in-process and stop it (KeyboardInterrupt) at the `at_call`-th member step."""
    import train_sae.training.trainer as trainer

    real, calls = trainer.Member.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Member, "step", step)
        code, _, err = train(monkeypatch, capsys, *argv)
    one_error(code, err, "interrupted")


def both_at_once(tool: str, argv: list[str], out: Path, tmp_path: Path) -> None:
    """Two `.venv/bin/<tool> ARGV` started together: exactly one writes, the other is refused
    in one line naming the winner's pid."""
    procs = [start(tool, argv, tmp_path / f"{i}.log") for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], errs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    one_error(codes[loser], errs[loser],
              f"is being written by another run ({tool}, pid {procs[winner].pid}")


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_two_cache_acts_writers_started_together(inputs, refs, tmp_path, attempt):
    ref, out = refs("run-big"), tmp_path / "store"
    both_at_once("cache-acts", run_args(inputs, out, "--resume", big=True), out, tmp_path)
    assert_same_store(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_two_train_sae_resumes_started_together(inputs, refs, tmp_path, monkeypatch, capsys,
                                                attempt):
    ref, out = refs("sweep-big"), tmp_path / "sweep"
    store = inputs / "train-big"
    interrupt_sweep(monkeypatch, capsys, sweep_args(store, out, big=True), at_call=3 + attempt)
    both_at_once("train-sae", sweep_args(store, out, "--resume", big=True), out, tmp_path)
    assert_same_sweep(ref, out)


# --- 5. inputs changed under --resume -----------------------------------------------------------

def interrupt_cache(monkeypatch, capsys, argv: list[str], phase: str) -> None:
    """Run `cache-acts` in-process and stop it (KeyboardInterrupt) in pass 1 (at the 20th
    forward pass) or pass 2 (while writing chunk 3); the resume state must say so."""
    import cache_acts.engine as engine
    import cache_acts.run as run

    target, name = (run, "capture") if phase == "pass 1" else (engine, "write_chunk")
    real, calls = getattr(target, name), []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == (20 if phase == "pass 1" else 4):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(target, name, crash)
        code, _, err = cache(monkeypatch, capsys, *argv)
    one_error(code, err, "interrupted")
    state = run_state(Path(argv[argv.index("--out") + 1]))
    assert state is not None and state["phase"] == ("scatter" if phase == "pass 1" else "gather")


def change_input(root: Path, what: str) -> tuple[list[str], str]:
    """Change one input of the run in `root`: (extra options, what the refusal must say)."""
    if what == "model seed":
        (root / "m.json").write_text(json.dumps({**TINY, "seed": 1}))
        return [], "the model changed content since the run started"
    if what == "dataset content":
        write_tokens(root / "tok.parquet", 100, seed=9)
        return [], "the dataset changed content since the run started"
    option, value, said = {
        "--seed": ("--seed", "5", "seed (was 0, now 5)"),
        "--dtype": ("--dtype", "float16", "dtype (was 'float32', now 'float16')"),
        "--chunk-rows": ("--chunk-rows", "16", "chunk_rows (was 32, now 16)"),
        "--batch-size": ("--batch-size", "4", "batch_size (was 2, now 4)"),
        "--tokens": ("--tokens", "700", "max_tokens (was None, now 700)"),
        "--model-dtype": ("--model-dtype", "bfloat16", "model_dtype (was 'float32'"),
        "--first-position": ("--first-position", "1", "packing (was"),
        "--compression": ("--compression", "zstd", "compression (was None, now 'zstd')"),
    }[what]
    return [option, value], said


def restore_inputs(root: Path) -> None:
    (root / "m.json").write_text(json.dumps(TINY))
    write_tokens(root / "tok.parquet", 100, seed=0)


def changed_cache_input_is_refused(refs, tmp_path, monkeypatch, capsys, what: str,
                                   phase: str) -> None:
    """Interrupt, change `what`, --resume: one line naming it and nothing written; restore it,
    --resume: the reference's bytes."""
    ref = refs("run")
    root = tmp_path / "inputs"
    root.mkdir()
    restore_inputs(root)
    out = tmp_path / "store"
    interrupt_cache(monkeypatch, capsys, run_args(root, out), phase)
    before = files(out)
    extra, said = change_input(root, what)
    code, _, err = cache(monkeypatch, capsys, *run_args(root, out, *extra, "--resume"))
    one_error(code, err, "--resume of", said)
    assert files(out) == before  # refused before touching anything
    restore_inputs(root)
    code, _, err = cache(monkeypatch, capsys, *run_args(root, out, "--resume"))
    assert code == 0, err
    assert_same_store(ref, out)


CHANGES_FAST = [("model seed", "pass 1"), ("dataset content", "pass 2"), ("--seed", "pass 2"),
                ("--dtype", "pass 1")]
CHANGES_ALL = ["model seed", "dataset content", "--seed", "--dtype", "--chunk-rows",
               "--batch-size", "--tokens", "--model-dtype", "--first-position", "--compression"]


@pytest.mark.parametrize(("what", "phase"), CHANGES_FAST)
def test_changed_cache_input_refuses_resume(refs, tmp_path, monkeypatch, capsys, what, phase):
    changed_cache_input_is_refused(refs, tmp_path, monkeypatch, capsys, what, phase)


@pytest.mark.slow
@pytest.mark.parametrize(("what", "phase"), [
    (what, phase) for what in CHANGES_ALL for phase in ("pass 1", "pass 2")
    if (what, phase) not in CHANGES_FAST])
def test_every_changed_cache_input_refuses_resume(refs, tmp_path, monkeypatch, capsys, what,
                                                  phase):
    changed_cache_input_is_refused(refs, tmp_path, monkeypatch, capsys, what, phase)


def replace_store(store: Path, seed: int) -> None:
    """Another store at the same path: the same shape and hook, other rows."""
    shutil.rmtree(store)
    x, _ = make_sparse_data(1024, 8, 16, 2, seed=seed)
    write_synthetic_store(store, x, hook="h", chunk_rows=256)


def test_store_replaced_under_an_interrupted_sweep(inputs, refs, tmp_path, monkeypatch, capsys):
    """(d) A sweep stopped after its step-8 checkpoint; its store replaced at the same path:
    --resume refuses in one line and writes nothing; the original back: identical results."""
    ref = refs("sweep")
    store, out = tmp_path / "store", tmp_path / "sweep"
    shutil.copytree(inputs / "train-small", store)
    interrupt_sweep(monkeypatch, capsys, sweep_args(store, out), at_call=21)  # in step 10 of 16
    assert (out / "checkpoint.pt").exists()
    before = files(out)
    replace_store(store, seed=1)
    code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume"))
    one_error(code, err, f"the store at {store} is not the one the sweep in {out}")
    assert files(out) == before
    shutil.rmtree(store)
    shutil.copytree(inputs / "train-small", store)
    code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume"))
    assert code == 0, err
    assert_same_sweep(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_store_replaced_under_a_killed_sweep(inputs, refs, tmp_path, monkeypatch, capsys, seed):
    """(d) with a real kill -9 at a random moment and a changed option as well."""
    ref = refs("sweep-big")
    store, out = tmp_path / "store", tmp_path / "sweep"
    shutil.copytree(inputs / "train-big", store)
    delay = random.Random(seed).uniform(0, 0.5) * ref_seconds("sweep-big")
    assert run_and_kill("train-sae", sweep_args(store, out, big=True), out, delay,
                        tmp_path / "log", lambda: (out / "checkpoint.pt").exists())
    before = files(out)
    code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume", big=True),
                         "--k", "4,16")
    one_error(code, err, "the options differ", "members")
    shutil.rmtree(store)
    x, _ = make_sparse_data(16384, 16, 32, 3, seed=seed + 1)
    write_synthetic_store(store, x, hook="h", chunk_rows=1024)
    code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume", big=True))
    one_error(code, err, "is not the one the sweep in")
    assert files(out) == before
    shutil.rmtree(store)
    shutil.copytree(inputs / "train-big", store)
    code, _, err = train(monkeypatch, capsys, *sweep_args(store, out, "--resume", big=True))
    assert code == 0, err
    assert_same_sweep(ref, out)
