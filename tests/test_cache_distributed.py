"""`torchrun` caching (cache_acts/engine.py on several ranks): real `torchrun --nproc-per-node 2
--no-python cache-acts run|import ...` on gloo, compared with the one-process store byte for
byte (every file of the store folder); two torchrun "nodes" on this machine; a failure on one
rank stops both with one line each and nothing marked complete; an interrupted 2-rank run
resumes to the same bytes with 2 ranks and is refused with 1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke, store_objects, write_tiny_run_inputs

from cache_acts.cli import main
from cache_acts.state import STATE_FILE, TMP_DIR

BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
CTX = 16
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = write_tiny_run_inputs(tmp_path_factory.mktemp("cache_dist"), CTX)
    np.save(root / "acts.npy", np.random.default_rng(1).normal(size=(1500, 24)).astype("<f4"))
    return root


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    """13 batches of 3 sequences (the last one short), cut at 500 tokens in the 11th; several
    buckets and commits (16 KiB of shuffle memory); 8 chunks in 4 shards."""
    return ["run", "--model", f"random:{root / 'tiny.json'}", "--dataset",
            str(root / "tok.parquet"), "--token-column", "ids", "--context-size", str(CTX),
            "--no-bos", "--hook", HOOKS[0], "--hook", HOOKS[1], "--batch-size", "3",
            "--tokens", "500", "--chunk-rows", "64", "--shard-rows", "128",
            "--shuffle-memory", "16KiB", "--device", "cpu", "--out", str(out), *extra]


def import_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["import", str(root / "acts.npy"), "--hook", "h", "--chunk-rows", "100",
            "--shard-rows", "200", "--shuffle-memory", "32KiB", "--out", str(out), *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args: list[str], n: int = 2, port: int | None = None, node: int | None = None,
                 fault: bool = False) -> list[str]:
    """torchrun of cache-acts ARGS on n processes (per node: `node` of 2 nodes)."""
    nodes = [] if node is None else ["--nnodes", "2", "--node-rank", str(node)]
    program = ([sys.executable, str(ROOT / "tests" / "rank_fault.py"), "cache-acts"] if fault
               else [str(BIN / "cache-acts")])
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), *nodes, "--master-addr",
            "127.0.0.1", "--master-port", str(port or free_port()), "--no-python", *program,
            *args]


def torchrun(args: list[str], n: int = 2, env: dict | None = None, fault: bool = False
             ) -> tuple[int, str]:
    environ = {**os.environ, **ENV, **(env or {})}  # the S3 fixture's variables too
    run = subprocess.run(torchrun_cmd(args, n, fault=fault), env=environ,
                         capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    return invoke(main, "cache-acts", monkeypatch, capsys, *args)


def same_folder(a: Path, b: Path) -> None:
    """The same files with the same bytes (the store, its manifest, every shard)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files), files


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error: " in line]


def no_rank_traceback(output: str) -> bool:
    """No traceback through the project's code (torchrun prints its own, ChildFailedError,
    when a rank exits with a non-zero code)."""
    return not any(f'File "{ROOT / package}' in output
                   for package in ("cache_acts", "shared", "train_sae"))


@pytest.fixture(scope="module")
def one_process(data: Path, tmp_path_factory) -> dict[str, Path]:
    """The one-process stores the distributed runs must equal."""
    folder = tmp_path_factory.mktemp("one")
    refs = {"run": folder / "run", "import": folder / "import"}
    for name, argv in (("run", run_args), ("import", import_args)):
        done = subprocess.run([str(BIN / "cache-acts"), *argv(data, refs[name])], env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return refs


@pytest.mark.parametrize("command", ["run", "import"])
def test_two_ranks_write_the_one_process_store(data, one_process, tmp_path, command):
    out = tmp_path / "two"
    argv = run_args if command == "run" else import_args
    code, output = torchrun(argv(data, out))
    assert code == 0, output
    same_folder(one_process[command], out)
    assert not (out / TMP_DIR).exists()
    assert output.count("cached 500 tokens" if command == "run" else "imported 1,500 rows") == 1


def test_two_ranks_write_to_an_object_store(data, one_process, s3, tmp_path):
    """2 ranks caching to s3:// (their work folder local) write the one-process store, object
    for object; a missing bucket is one line and exit 2 on both ranks."""
    out = s3.url("two-ranks")
    code, output = torchrun(run_args(data, out, "--tmp-dir", str(tmp_path / "work")))
    assert code == 0, output
    assert store_objects(out) == store_objects(str(one_process["run"]))
    code, output = torchrun(run_args(data, "s3://no-such-bucket-here/x"))
    assert code == 1 and output.count("exitcode  : 2") == 2, output
    lines = error_lines(output)
    assert len(lines) == 2 and all("no-such-bucket-here" in line for line in lines), output


def test_two_nodes_write_the_one_process_store(data, one_process, tmp_path):
    """Two torchrun launches (--nnodes 2, one process each) meeting on 127.0.0.1, sharing the
    --out folder (its work folder carries the shuffle's buckets between them)."""
    out, port = tmp_path / "nodes", free_port()
    procs = [subprocess.Popen(torchrun_cmd(run_args(data, out), n=1, port=port, node=node),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    same_folder(one_process["run"], out)


def test_nodes_that_do_not_share_out_stop_with_one_line(data, tmp_path):
    port = free_port()
    procs = [subprocess.Popen(torchrun_cmd(run_args(data, tmp_path / f"node{node}"), n=1,
                                           port=port, node=node),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outputs  # torchrun's code for failed ranks
    for output in outputs:
        assert "exitcode  : 2" in output, output  # the rank's own code
        (line,) = error_lines(output)
        assert "does not see the work folder" in line and "storage they all share" in line
        assert no_rank_traceback(output), output
    assert not (tmp_path / "node0" / "zarr.json").exists()


def test_a_failing_rank_stops_every_rank_with_one_line(data, tmp_path):
    """Rank 1's model gives NaN: it refuses them, rank 0 stops with it; exit 2 on both."""
    out = tmp_path / "nan"
    code, output = torchrun(run_args(data, out), fault=True,
                            env={"FAULT_RANK": "1", "FAULT": "nan"})
    assert code == 1 and output.count("exitcode  : 2") == 2, output  # each rank's own code: 2
    lines = error_lines(output)
    assert len(lines) == 2 and no_rank_traceback(output), output
    assert any("are NaN or inf" in line and "rank 1 of 2 failed" not in line for line in lines)
    assert any("rank 1 of 2 failed" in line and "rank 0 stopped with it" in line
               for line in lines)
    assert not (out / "zarr.json").exists()


def test_an_interrupted_run_resumes_with_as_many_ranks(data, one_process, tmp_path,
                                                        monkeypatch, capsys):
    """Rank 0 crashes in pass 2 after a committed shard; --resume with 1 process is refused
    in one line, with 2 it finishes the same bytes."""
    out = tmp_path / "crashed"
    code, output = torchrun(run_args(data, out), fault=True,
                            env={"FAULT_RANK": "0", "FAULT": "crash-pass-2"})
    assert code == 1 and "simulated crash in pass 2" in output, output
    assert output.count("exitcode  : 1") == 2, output  # the bug on rank 0; rank 1 stops with it
    state = json.loads((out / TMP_DIR / STATE_FILE).read_text())
    assert state["phase"] == "gather" and state["world_size"] == 2
    assert state["chunks_done"][0] == 2  # rank 0 sealed its first shard, then crashed
    code, _, err = cli(monkeypatch, capsys, *run_args(data, out, "--resume"))
    assert code == 2 and "started by 2 process(es) and this one has 1" in err
    code, output = torchrun(run_args(data, out, "--resume"))
    assert code == 0, output
    same_folder(one_process["run"], out)


@pytest.mark.slow
def test_kill_9_of_every_rank_then_resume(data, one_process, tmp_path):
    """SIGKILL to the whole torchrun process group in pass 1 and in pass 2, then --resume."""
    out = tmp_path / "killed"
    args = run_args(data, out)
    for phase in ("scatter", "gather"):
        proc = subprocess.Popen(torchrun_cmd(args + (["--resume"] if phase == "gather" else [])),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        t0, killed = time.time(), False
        while proc.poll() is None and time.time() - t0 < 120:
            try:
                state = json.loads((out / TMP_DIR / STATE_FILE).read_text())
            except (OSError, ValueError):
                state = None
            if state and state["phase"] == phase and (
                    state["rows_done"] > 0 if phase == "scatter"
                    else sum(state["chunks_done"]) > 4):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.005)
        assert killed, f"the run ended before it could be killed in {phase}"
    code, output = torchrun(args + ["--resume"])
    assert code == 0, output
    same_folder(one_process["run"], out)
