"""`torchrun` sweeps (shared/distributed.py, train_sae/training/trainer.py): real
`torchrun --nproc-per-node 2 --no-python train-sae sweep ...` runs on gloo, compared with a
one-process sweep of the same options.

- members spread over the ranks by cost give the one-process outputs byte for byte;
- `--data-parallel` matches one process with the same global batch to float tolerance;
- a sweep stopped after a checkpoint resumes with `--resume` to the same bytes, on 2 ranks and
  in one process (the checkpoint does not depend on the number of ranks; kill -9 of both ranks:
  -m slow);
- a failure on one rank stops both with one line each, exit 2, the sweep not marked complete
  (and a bug on one rank: its traceback there, one line and exit 1 on the other);
- `train-sae eval` spread over the ranks writes what one process writes (-m slow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import zarr
from conftest import invoke
from safetensors.torch import load_file
from synthetic import make_sparse_data, write_multihook_store

from cache_acts.cli import main as cache_main
from shared.distributed import World, balance, init
from shared.errors import UserError
from train_sae.cli import main
from train_sae.dictionaries.base import WHOLE_BATCH, ShardedBatch
from train_sae.evaluation.eval_sweep import EvalMember, spread
from train_sae.evaluation.evaluate import SpliceTarget
from train_sae.training import trainer
from train_sae.training.checkpoint import save_checkpoint
from train_sae.training.config import MemberConfig
from train_sae.training.trainer import member_cost, place

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
# two hooks of different widths; every rank reads the same batches of the hooks it needs
SPREAD = ["--hook", "all", "--arch", "topk,relu,crosscoder", "--width", "32", "--k", "4",
          "--l1", "1", "--lr", "1e-2", "--batch-size", "64", "--log-every", "10",
          "--device", "cpu", "--resample-at", "0.5"]
# the five members above: a--topk, a--relu (512 each), b--topk, b--relu (256), crosscoder (768)
SPREAD_LINE = ("members spread over 2 ranks by cost (width x (d_in + d_out)): rank 0 trains 3 "
               "(cost 2560), rank 1 trains 2 (cost 2048)")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "store"
    x_a, _ = make_sparse_data(4096, 16, 32, 2, seed=3)
    x_b, _ = make_sparse_data(4096, 8, 16, 2, seed=4)
    write_multihook_store(path, {"a": x_a, "b": x_b}, chunk_rows=512)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args: str, n: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--tee", "3", "--no-python",
            str(BIN / "train-sae"), *args]


def torchrun(*args: str) -> tuple[int, str]:
    """`torchrun ... train-sae ARGS` on 2 ranks: (exit code, stdout + stderr); the ranks' lines
    carry [default<rank>]: prefixes."""
    run = subprocess.run(torchrun_cmd(*args), env=ENV, capture_output=True, text=True,
                         timeout=300)
    return run.returncode, run.stdout + run.stderr


def sweep(store: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--store", str(store), "--out", str(out), *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


def one_process(monkeypatch, capsys, *args: str) -> str:
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, *args)
    assert code == 0, err
    return err


def test_spread_sweep_is_byte_identical_to_one_process(store, tmp_path, monkeypatch, capsys):
    extra = [*SPREAD, "--tokens", str(64 * 120), "--checkpoint-every", "25"]
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "one", *extra))
    code, output = torchrun(*sweep(store, tmp_path / "two", *extra))
    assert code == 0, output
    assert f"[default0]:{SPREAD_LINE}" in output  # balanced by width x d_in
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert len([f for f in one if f.endswith("_weights.safetensors")]) == 5
    for name in one:
        assert one[name] == two[name], name
    # only rank 0 prints the summary (5 lines) and the progress bar
    lines = output.splitlines()
    assert sum(line.startswith("[default0]:done ") for line in lines) == 5
    assert [line for line in lines if line.startswith("[default1]:")] == []


@pytest.mark.parametrize("kernels", ["dense", "torch"])
def test_data_parallel_matches_one_process(store, tmp_path, monkeypatch, capsys, kernels):
    # AuxK with dead latents and its normalisation, BatchTopK's batch-wide budget and threshold,
    # relu resampling, a crosscoder: every statistic over the batch is reduced over the ranks
    # (the TopK family in the dense and in the sparse step)
    extra = ["--hook", "all", "--arch", "topk,batchtopk,relu,crosscoder", "--width", "64",
             "--k", "4", "--l1", "3", "--lr", "3e-2", "--batch-size", "64", "--log-every", "10",
             "--tokens", str(64 * 60), "--device", "cpu", "--resample-at", "0.5",
             "--param", "dead_tokens_threshold=300", "--param", "aux_normalize=true",
             "--kernels", kernels]
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "one", *extra))
    code, output = torchrun(*sweep(store, tmp_path / "dp", *extra, "--data-parallel"))
    assert code == 0, output
    assert "data-parallel over 2 ranks: each trains every member on 32 rows" in output
    one, dp = tmp_path / "one", tmp_path / "dp"
    assert (one / "sweep.json").read_bytes() == (dp / "sweep.json").read_bytes()
    members = [p.name for p in sorted(one.iterdir()) if p.is_dir()]
    assert len(members) == 7
    assert members == [p.name for p in sorted(dp.iterdir()) if p.is_dir()]
    resampled = 0
    for name in members:
        for weights in ("sae_weights.safetensors", "crosscoder_weights.safetensors",
                        "sparsity.safetensors"):
            if (one / name / weights).exists():
                a, b = load_file(one / name / weights), load_file(dp / name / weights)
                for k in a:
                    torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")
        ma = json.loads((one / name / "metrics.json").read_text())
        mb = json.loads((dp / name / "metrics.json").read_text())
        assert ma["final"] == pytest.approx(mb["final"], rel=1e-4, abs=1e-6), name
        assert ma["resampled"] == mb["resampled"]
        resampled += ma["resampled"] or 0
        la = [json.loads(x) for x in (one / name / "metrics.jsonl").read_text().splitlines()]
        lb = [json.loads(x) for x in (dp / name / "metrics.jsonl").read_text().splitlines()]
        assert len(la) == len(lb) == 6
        for ra, rb in zip(la, lb, strict=True):
            assert ra == pytest.approx(rb, rel=1e-4, abs=1e-6), name
            if "aux" in ra:
                assert ra["dead_fraction"] == rb["dead_fraction"]
    assert resampled > 0  # the resampling path ran (on every rank, from whole batches)
    aux = [json.loads(x)["aux"] for x in
           (one / "a--topk-w64-aux_normalizeon-dead300-k4-lr0.03" / "metrics.jsonl")
           .read_text().splitlines()]
    assert max(aux) > 0  # dead latents: the AuxK loss (and its variance) took part


def test_interrupted_sweep_resumes_on_two_ranks(store, tmp_path, monkeypatch, capsys):
    """A one-process sweep stopped right after its first checkpoint resumes on 2 ranks, each
    reading its members' states from the one checkpoint, to the bytes of an uninterrupted run."""
    extra = [*SPREAD, "--tokens", str(64 * 150), "--checkpoint-every", "40"]
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "ref", *extra))

    def save_then_stop(folder, state):
        save_checkpoint(folder, state)
        raise KeyboardInterrupt  # Ctrl-C right after the checkpoint

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(trainer, "save_checkpoint", save_then_stop)
        code, _, err = invoke(main, "train-sae", monkeypatch, capsys,
                              *sweep(store, stopped, *extra))
    assert code == 2 and "interrupted" in err
    assert (stopped / "checkpoint.pt").exists()
    code, output = torchrun(*sweep(store, stopped, *extra, "--resume"))
    assert code == 0, output
    assert "resuming at step 40" in output
    assert files(stopped) == files(tmp_path / "ref")


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_bytes(store, tmp_path, monkeypatch, capsys):
    """kill -9 of both ranks after a checkpoint rank 0 gathered; --resume on 2 ranks and in one
    process (another world size) both finish with the bytes of an uninterrupted run."""
    extra = [*SPREAD, "--tokens", str(64 * 300), "--checkpoint-every", "25"]
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "ref", *extra))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(*sweep(store, killed, *extra)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    for pid in children(proc.pid):  # the ranks (torchrun starts each in a session of its own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert json.loads((killed / "sweep.json").read_text())["status"] == "running"
    shutil.copytree(killed, tmp_path / "killed-1", symlinks=True)

    code, output = torchrun(*sweep(store, killed, *extra, "--resume"))  # the same 2 ranks
    assert code == 0, output
    assert "resuming at step" in output
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "killed-1", *extra, "--resume"))
    ref = files(tmp_path / "ref")
    for resumed in (killed, tmp_path / "killed-1"):  # 2 ranks, and one process
        got = files(resumed)
        assert sorted(got) == sorted(ref), resumed
        for name in ref:
            assert got[name] == ref[name], (resumed, name)


def test_failure_on_one_rank_stops_every_rank(store, tmp_path):
    # wrong checksums recorded for hook b: only rank 1 (b's member) reads that hook
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    group = zarr.open_group(str(bad), mode="r+")
    manifest = dict(group.attrs["manifest"])
    manifest["checksums"]["acts/b"] = [crc ^ 1 for crc in manifest["checksums"]["acts/b"]]
    group.attrs["manifest"] = manifest
    out = tmp_path / "out"
    code, output = torchrun(*sweep(bad, out, "--hook", "all", "--arch", "topk", "--width", "32",
                                   "--k", "4", "--batch-size", "64", "--device", "cpu"))
    lines = output.splitlines()
    # a rank's line may follow another rank's progress bar, which ends without a newline
    errors = {r: [x[x.index(f"[default{r}]:error:"):] for x in lines
                  if f"[default{r}]:error:" in x] for r in (0, 1)}
    assert len(errors[1]) == 1 and "of hook 'b'" in errors[1][0], output
    assert "checksum" in errors[1][0]
    assert len(errors[0]) == 1, output
    own = errors[1][0].removeprefix("[default1]:error: ")
    assert errors[0][0] == f"[default0]:error: rank 1 of 2 failed: {own} (rank 0 stopped with it)"
    assert output.count("exitcode  : 2") == 2, output  # both ranks' own code: neither cut short
    assert code != 0
    assert json.loads((out / "sweep.json").read_text())["status"] == "running"
    assert not (out / "a--topk-w32-k4-lr0.01" / "sae_weights.safetensors").exists()
    assert not (out / ".lock").exists()


AGREE_SCRIPT = """
import torch
import typer

from shared.distributed import exit_together, init
from shared.errors import run_cli

app = typer.Typer(add_completion=False)


@app.command()
def go() -> None:
    with init("cpu") as world:
        assert world.distributed and world.world_size == 2
        assert world.all_gather_object(world.rank * 10) == [0, 10]
        assert world.broadcast_object("hi" if world.is_main else None) == "hi"
        assert world.gather_object(world.rank) == ([0, 1] if world.is_main else None)
        assert world.all_reduce(torch.tensor([world.rank + 1.0])).item() == 3.0
        assert world.all_gather(torch.tensor([world.rank])).tolist() == [0, 1]
        print(f"rank {world.rank} met", flush=True)
        if world.rank == 1:
            raise RuntimeError("boom")  # a bug on rank 1, between two meeting points
        world.agree()  # rank 0 waits here


with exit_together():
    run_cli(app)
"""


def test_an_internal_error_on_one_rank_stops_both(tmp_path):
    """shared/distributed.py alone: the collectives on two ranks, then a bug on rank 1: it prints
    its traceback, rank 0 one line naming it, and both exit 1 (neither cut short by torchrun)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    cmd = torchrun_cmd(str(script))
    cmd.remove("--no-python")
    cmd.remove(str(BIN / "train-sae"))
    run = subprocess.run(cmd, env={**ENV, "PYTHONPATH": str(Path(__file__).parents[1])},
                         capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert "[default0]:rank 0 met" in output and "[default1]:rank 1 met" in output, output
    assert "[default1]:RuntimeError: boom" in output
    assert [x for x in output.splitlines() if x.startswith("[default0]:error:")] == [
        "[default0]:error: rank 1 of 2 failed with an internal error (RuntimeError: boom; its "
        "traceback is in that rank's output); rank 0 stopped with it"]
    assert output.count("exitcode  : 1") == 2, output


@pytest.mark.slow
def test_eval_spread_over_ranks_writes_what_one_process_writes(tmp_path, monkeypatch, capsys):
    """`train-sae eval` under torchrun: the SAEs spread over 2 ranks by the cost of their spliced
    passes; every metrics.json as one process writes it, rank 0 prints the table of all four."""
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"n_layers": 2, "d_model": 16, "n_ctx": 32, "d_head": 4,
                                 "n_heads": 4, "d_mlp": 32, "d_vocab": 48, "act_fn": "gelu",
                                 "normalization_type": "LN", "seed": 5}))
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"ids": torch.randint(1, 48, (20,), generator=g).tolist()})
                            + "\n" for _ in range(40)))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"]
    store = tmp_path / "store"
    code, _, err = invoke(cache_main, "cache-acts", monkeypatch, capsys, "run", "--model",
                          f"random:{model}", "--dataset", str(data), "--token-column", "ids",
                          "--context-size", "16", "--no-bos", "--hook", hooks[0], "--hook",
                          hooks[1], "--tokens", "384", "--chunk-rows", "128", "--device", "cpu",
                          "--out", str(store))
    assert code == 0, err
    one_process(monkeypatch, capsys, *sweep(store, tmp_path / "one", "--hook", "all", "--arch",
                                            "topk", "--width", "32,64", "--k", "4",
                                            "--batch-size", "64", "--device", "cpu"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    args = ["--n-tokens", "160", "--batch-size", "4", "--device", "cpu"]
    one_process(monkeypatch, capsys, "eval", str(tmp_path / "one"), *args)
    code, output = torchrun("eval", str(tmp_path / "two"), *args)
    assert code == 0, output
    assert output.count("[default0]:evaluated 4 SAE(s)") == 1
    assert "[default1]:evaluated" not in output
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert all("eval" in json.loads(p.read_text())
               for p in (tmp_path / "two").glob("*/metrics.json"))


# --- in-process: the assignment and the world description -------------------------------------
def test_balance_is_greedy_longest_processing_time():
    assert balance([3, 5, 4, 3, 3], 2) == [1, 0, 1, 0, 1]  # 5 -> 0, 4 -> 1, the 3s: 1, 0, 1
    assert balance([1, 1, 1, 1], 4) == [0, 1, 2, 3]
    assert balance([7], 3) == [0]
    # `--hook all` over 8 layers, 2 widths each: each rank gets the same load
    costs = [w * 768 for _ in range(8) for w in (4096, 8192)]
    owner = balance(costs, 4)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(4)]
    assert max(loads) == min(loads) == sum(costs) // 4


def test_place_spreads_by_cost_or_shards_the_batch():
    dims = {"a": 16, "b": 8}
    members = [MemberConfig("topk", 64, hooks=("a",), name="a64"),
               MemberConfig("topk", 32, hooks=("b",), name="b32"),
               MemberConfig("crosscoder", 16, hooks=("a", "b"), name="cc"),
               MemberConfig("topk", 32, hooks=("a",), name="a32")]
    assert [member_cost(m, dims) for m in members] == [2048, 512, 768, 1024]
    one = place(members, dims, 64, World(), data_parallel=True)
    assert one.trains == (0, 1, 2, 3) and one.writes and one.batch is WHOLE_BATCH
    r0, r1 = (place(members, dims, 64, World(r, 2), data_parallel=False) for r in (0, 1))
    assert (r0.trains, r1.trains) == ((0,), (1, 2, 3))  # 1024 | 512 + 384 + 256
    assert r0.writes and r1.writes and r1.batch is WHOLE_BATCH
    dp = place(members, dims, 64, World(1, 2), data_parallel=True)
    assert dp.trains == (0, 1, 2, 3) and not dp.writes and dp.rows == slice(32, 64)
    assert isinstance(dp.batch, ShardedBatch) and dp.batch.rows(32) == 64
    with pytest.raises(UserError, match="divisible by 2"):
        place(members, dims, 63, World(0, 2), data_parallel=True)
    with pytest.raises(UserError, match="start at most 4 .* or train every member on every "
                                        "rank with --data-parallel"):
        place(members, dims, 64, World(0, 5), data_parallel=False)


def test_eval_spreads_members_by_the_cost_of_their_spliced_passes():
    members = [EvalMember(f"m{i}", Path(f"m{i}"), SpliceTarget(f"m{i}", hook, None), "")
               for i, hook in enumerate(["blocks.0.hook_resid_post", "blocks.3.hook_resid_pre",
                                         "blocks.1.hook_mlp_out", "hook_embed"])]
    # spliced passes from block 0, 3, 1 and the start, in a model of 4 blocks: costs 5, 2, 4, 5
    # (blocks + unembedding); largest first: m0 -> 0, m3 -> 1, m2 -> 0 (9), m1 -> 1 (7)
    shares = [[m.name for m in spread(members, 4, World(r, 2))] for r in (0, 1)]
    assert shares == [["m0", "m2"], ["m1", "m3"]]
    assert spread(members, 4, World()) == members
    with pytest.raises(UserError, match="start at most 4"):
        spread(members, 4, World(0, 5))


def test_world_from_the_torchrun_environment():
    assert World.from_env({}) == World() and not World().distributed
    assert World.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World()  # torchrun of one
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}
    w = World.from_env(env)
    assert (w.rank, w.world_size, w.local_rank, w.distributed, w.is_main) == (3, 4, 1, True, False)
    assert w.device("cuda") == "cuda:1" and w.device("cpu") == "cpu"
    assert World().device("cuda") == "cuda"
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT is not set; start"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(UserError, match="RANK 2 is outside 0..1"):
        World.from_env({**env, "WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(UserError, match="WORLD_SIZE='two' is not a whole number"):
        World.from_env({"WORLD_SIZE": "two"})
    alone = init("cpu", environ={})  # not launched by torchrun: no process group, no-ops
    with alone:
        assert alone.all_gather_object({"x": 1}) == [{"x": 1}]
        assert alone.broadcast_object(5) == 5 and alone.gather_object(2) == [2]
        t = torch.ones(2)
        assert alone.all_reduce(t) is t and alone.all_gather(t) is t
        alone.agree()
