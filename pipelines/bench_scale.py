"""Scaling benchmark: ratios measured side by side in one run (this machine is noisy, so the
variants alternate round by round, ABBA, and each reports its best round).

1. `cache-acts run` on 2 ranks (torchrun, 1 thread each) vs 1 process (2 threads), same random
   model, same tokens: tokens/s of each (the run time cache-acts prints, and the wall time of the
   whole command with its start-up) and their ratio; the two stores must be byte-identical.
2. an 8-member `train-sae sweep` (TopK, k 8,16,32,64 x 2 widths, one hook) on 2 ranks (1 thread
   each) vs 1 process (2 threads): tokens/s over the wall time and over the training alone (from
   the `training N member(s)` line to the end) and the ratios. The weights of the 2 ranks must
   equal, byte for byte, those of 1 process with the same threads per process (1), trained once as
   the reference (also timed); whether the 2-thread process gives the same bytes is reported (it
   need not: the BLAS sums in another order with 2 threads).
3. `ActivationLoader` rows/s from a local S3 server (moto on 127.0.0.1, tests/s3_server.py) vs
   from local disk, for the same store (cached once to a local folder and once with
   `cache-acts run --out s3://...`, whose objects must equal the local files byte for byte).
4. files and bytes of the sharded store (default --shard-rows) vs one with --shard-rows equal to
   --chunk-rows (one chunk per object, as many objects as the unsharded format 1), same data.

Before each timed run the previous output is removed and the page cache synced, outside the
timing. The table at the end is also written to OUT/bench_scale.json (with every round's time
and the machine's load average, since other processes skew every figure); the stores go to
OUT/work, removed at the end unless --keep.

    bash pipelines/bench_scale.sh [--quick] [--out runs/bench_scale] [--tokens N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and tests/s3_server.py

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import zarr  # noqa: E402
from s3_server import CREDENTIALS, S3Server, free_port  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "bench-scale"

# Sizes: the full run keeps each cache-acts run near 20 s and the whole script under ~6 minutes
# on 2 CPU cores; --quick is toy-sized (a test runs it). The model dominates caching: d_model 256,
# 4 layers, context 128 (~7 MFLOP per token).
FULL = dict(
    model=dict(n_layers=4, d_model=256, d_mlp=1024, n_heads=8, d_head=32, d_vocab=1024,
               n_ctx=128, act_fn="gelu", normalization_type="LN", seed=0),
    context=128, tokens=196_608, batch_size=32, chunk_rows=4096,
    sweep_tokens=32_768, sweep_batch=4096, widths="1024,2048", ks="8,16,32,64",
    loader_batch=4096, rounds=3, loader_rounds=3, timeout=600,
)
QUICK = dict(
    model=dict(n_layers=2, d_model=32, d_mlp=64, n_heads=4, d_head=8, d_vocab=128, n_ctx=32,
               act_fn="gelu", normalization_type="LN", seed=0),
    context=32, tokens=4096, batch_size=8, chunk_rows=256,
    sweep_tokens=1024, sweep_batch=128, widths="64,128", ks="4,8,16,32",
    loader_batch=256, rounds=1, loader_rounds=2, timeout=180,
)

T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {text}", flush=True)


# --- running the tools -------------------------------------------------------------------------

def env(threads: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", **extra}


def launch(program: str, args: list[str], ranks: int) -> list[str]:
    """The command line: the program alone (ranks == 1) or under torchrun on `ranks` processes."""
    if ranks == 1:
        return [str(BIN / program), *args]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "--no-python", str(BIN / program), *args]


def timed(cmd: list[str], environ: dict[str, str], timeout: float, mark: str | None = None
          ) -> tuple[float, str, float | None]:
    """(wall seconds, stdout + stderr, seconds from the first output line containing `mark` to
    the end) of a command that must succeed. Lines are read as they come (stderr is line
    buffered), so the mark's time is when the program printed it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    killer = threading.Timer(timeout, proc.kill)  # only this command's own process
    killer.start()
    lines, marked = [], None
    try:
        for line in proc.stdout:
            if marked is None and mark is not None and mark in line:
                marked = time.perf_counter()
            lines.append(line)
        code = proc.wait()
    finally:
        killer.cancel()
    end = time.perf_counter()
    output = "".join(lines)
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {code}:\n{output[-4000:]}")
    return end - t0, output, None if marked is None else end - marked


def run_seconds(output: str) -> float:
    """The run time cache-acts prints: `cached N tokens x H hook(s) in X.Xs`."""
    m = re.search(r"cached [\d,]+ tokens x \d+ hook\(s\) in ([\d.]+)s", output)
    if m is None:
        raise SystemExit(f"error: no `cached ... in Xs` line in:\n{output[-2000:]}")
    return float(m.group(1))


def interleaved(variants: dict[str, object], rounds: int) -> None:
    """Call each variant once per round, the order reversed every other round (ABBA)."""
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            variants[name]()


def files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def same_files(a: Path, b: Path) -> bool:
    fa, fb = files(a), files(b)
    return bool(fa) and fa.keys() == fb.keys() and all(
        fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


def fresh(path: Path) -> Path:
    """`path` removed, and the page cache's dirty pages written out (outside any timing), so a
    run does not pay for writing back the previous run's files."""
    if path.exists():
        shutil.rmtree(path)
    os.sync()
    return path


# --- the inputs --------------------------------------------------------------------------------

def write_inputs(work: Path, size: dict) -> tuple[Path, Path]:
    """The random model's config and a parquet file of random token ids (a few spare rows)."""
    model = work / "model.json"
    model.write_text(json.dumps(size["model"]))
    n_seq = -(-size["tokens"] // size["context"]) + 2
    ids = np.random.default_rng(0).integers(0, size["model"]["d_vocab"], (n_seq, size["context"]))
    tokens = work / "tokens.parquet"
    pq.write_table(pa.table({"ids": ids.tolist()}), tokens)
    return model, tokens


def cache_args(size: dict, model: Path, tokens: Path, hook: str, out: str, *extra: str
               ) -> list[str]:
    return ["run", "--model", f"random:{model}", "--dataset", str(tokens), "--token-column",
            "ids", "--context-size", str(size["context"]), "--no-bos", "--hook", hook,
            "--tokens", str(size["tokens"]), "--batch-size", str(size["batch_size"]),
            "--chunk-rows", str(size["chunk_rows"]), "--device", "cpu", "--out", out, *extra]


# --- 1. caching: 2 ranks vs 1 process ----------------------------------------------------------

def bench_cache(work: Path, size: dict, model: Path, tokens: Path, hook: str, rounds: int
                ) -> tuple[list[dict], Path]:
    outs = {"one": work / "cache-1proc", "two": work / "cache-2ranks"}
    runs: dict[str, list[tuple[float, float]]] = {"one": [], "two": []}  # (run s, wall s)

    def variant(name: str, ranks: int, threads: int):
        def go() -> None:
            out = fresh(outs[name])
            wall, output, _ = timed(launch("cache-acts", cache_args(size, model, tokens, hook,
                                                                    str(out)), ranks),
                                    env(threads), size["timeout"])
            runs[name].append((run_seconds(output), wall))
            say(f"cache {ranks} process(es) x {threads} thread(s): run {runs[name][-1][0]:.1f}s, "
                f"wall {wall:.1f}s")
        return go

    interleaved({"one": variant("one", 1, 2), "two": variant("two", 2, 1)}, rounds)
    identical = same_files(outs["one"], outs["two"])
    n = size["tokens"]
    out = []
    for key, label in ((0, "run time"), (1, "wall")):
        one = n / min(r[key] for r in runs["one"])
        two = n / min(r[key] for r in runs["two"])
        out.append(dict(
            name=f"cache_{'run' if key == 0 else 'wall'}",
            what=f"cache tokens/s ({label})", unit="tokens/s",
            baseline=dict(label="1 proc x 2 thr", value=one),
            variant=dict(label="2 ranks x 1 thr", value=two), ratio=two / one,
            check=dict(what="stores byte-identical", ok=identical),
            samples={"1 proc x 2 thr": [r[key] for r in runs["one"]],
                     "2 ranks x 1 thr": [r[key] for r in runs["two"]]},
        ))
    shutil.rmtree(outs["two"])
    return out, outs["one"]


# --- 2. an 8-member sweep: 2 ranks vs 1 process ------------------------------------------------

def bench_sweep(work: Path, size: dict, store: Path, rounds: int) -> list[dict]:
    """Wall time of each sweep, and its training time: from the `training N member(s)` line
    (printed once the store is open and the members built) to the end of the command."""
    outs = {k: work / f"sweep-{k}" for k in ("1p2t", "2r1t", "1p1t")}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in outs}  # (wall, training)
    args = ["--arch", "topk", "--k", size["ks"], "--width", size["widths"], "--tokens",
            str(size["sweep_tokens"]), "--batch-size", str(size["sweep_batch"]), "--device",
            "cpu"]

    def variant(name: str, ranks: int, threads: int):
        def go() -> None:
            out = fresh(outs[name])
            wall, output, train = timed(
                launch("train-sae", ["sweep", "--store", str(store), "--out", str(out), *args],
                       ranks), env(threads), size["timeout"], mark=" member(s) on ")
            if train is None:
                raise SystemExit(f"error: no `training N member(s)` line in:\n{output[-2000:]}")
            times[name].append((wall, train))
            say(f"sweep {ranks} process(es) x {threads} thread(s): wall {wall:.1f}s, "
                f"training {train:.1f}s")
        return go

    interleaved({"1p2t": variant("1p2t", 1, 2), "2r1t": variant("2r1t", 2, 1)}, rounds)
    variant("1p1t", 1, 1)()  # the byte-identity reference: the same threads per process
    weights = {k: {name: p for name, p in files(o).items()
                   if name.endswith("sae_weights.safetensors")} for k, o in outs.items()}
    n_members = len(size["ks"].split(",")) * len(size["widths"].split(","))
    same_1t = (len(weights["2r1t"]) == n_members and weights["2r1t"].keys()
               == weights["1p1t"].keys()
               and all(weights["2r1t"][k].read_bytes() == weights["1p1t"][k].read_bytes()
                       for k in weights["2r1t"]))
    same_2t, max_diff = weight_diff(weights["2r1t"], weights["1p2t"])
    n = size["sweep_tokens"]
    check = dict(what=f"weights = 1 proc x 1 thr ({len(weights['2r1t'])}/{n_members})",
                 ok=same_1t)
    info = ("weights of 2 ranks vs 1 proc x 2 thr: "
            + ("byte-identical" if same_2t else
               f"differ by up to {max_diff:.2g} (2 BLAS threads sum in another order)"))
    labels = {"1p2t": "1 proc x 2 thr", "2r1t": "2 ranks x 1 thr", "1p1t": "1 proc x 1 thr"}

    def line(name: str, key: int, base: str, what: str, note: str) -> dict:
        rate = {k: n / min(t[key] for t in times[k]) for k in (base, "2r1t")}
        return dict(name=name, what=what, unit="tokens/s",
                    baseline=dict(label=labels[base], value=rate[base]),
                    variant=dict(label=labels["2r1t"], value=rate["2r1t"]),
                    ratio=rate["2r1t"] / rate[base], check=check, info=note,
                    samples={labels[k]: [t[key] for t in times[k]] for k in (base, "2r1t")})

    what = f"{n_members}-member sweep tokens/s"
    return [
        line("sweep_wall", 0, "1p2t", f"{what} (wall)", info),
        line("sweep_train", 1, "1p2t", f"{what} (training)", info),
        line("sweep_train_1thread", 1, "1p1t", f"{what} (training)",
             "1 proc x 1 thr: one run after the rounds (the identity reference)"),
    ]


def weight_diff(a: dict[str, Path], b: dict[str, Path]) -> tuple[bool, float]:
    """(byte-identical, largest absolute difference of any tensor) of two sets of weights."""
    from safetensors.numpy import load_file

    if a.keys() != b.keys():
        return False, float("inf")
    same, worst = True, 0.0
    for k in a:
        if a[k].read_bytes() == b[k].read_bytes():
            continue
        same = False
        ta, tb = load_file(a[k]), load_file(b[k])
        for name in ta:
            diff = np.abs(ta[name].astype(np.float64) - tb[name].astype(np.float64))
            worst = max(worst, float(diff.max(initial=0.0)))
    return same, worst


# --- 3. the loader: S3 (moto) vs local disk ----------------------------------------------------

def bench_loader(work: Path, size: dict, model: Path, tokens: Path, hook: str, local: Path,
                 local_run_s: float, rounds: int) -> list[dict]:
    from shared.storage import location
    from shared.store import open_store
    from train_sae.training.loader import ActivationLoader

    with S3Server() as server:
        server.create_bucket(BUCKET)
        s3_env = {**CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint}
        os.environ.update(s3_env)  # for this process's s3fs (botocore reads them)
        url = f"s3://{BUCKET}/store"
        wall, output, _ = timed(launch("cache-acts", cache_args(size, model, tokens, hook, url),
                                       1), env(2, **s3_env), size["timeout"])
        s3_run = run_seconds(output)
        say(f"cache 1 process x 2 threads to {url}: run {s3_run:.1f}s, wall {wall:.1f}s")
        identical = same_objects(server, "store", local)
        stores = {"local": open_store(location(str(local))), "s3": open_store(location(url))}
        batch = size["loader_batch"]
        n_batches = stores["local"].manifest.n_rows // batch
        seconds: dict[str, list[float]] = {k: [] for k in stores}

        def variant(name: str):
            def go() -> None:
                seed = len(seconds[name])
                t0 = time.perf_counter()
                for _ in ActivationLoader(stores[name], [hook], batch, n_batches, seed=seed):
                    pass
                seconds[name].append(time.perf_counter() - t0)
                say(f"loader from {name}: {n_batches * batch / seconds[name][-1]:,.0f} rows/s")
            return go

        interleaved({"local": variant("local"), "s3": variant("s3")}, rounds)
        server.delete_bucket(BUCKET)
    rows = n_batches * batch
    rate = {k: rows / min(v) for k, v in seconds.items()}
    n = size["tokens"]
    return [
        dict(name="loader", what="loader rows/s (one pass)", unit="rows/s",
             baseline=dict(label="local disk", value=rate["local"]),
             variant=dict(label="S3 (moto)", value=rate["s3"]), ratio=rate["s3"] / rate["local"],
             check=dict(what="S3 objects = local files", ok=identical),
             samples={"local disk": seconds["local"], "S3 (moto)": seconds["s3"]}),
        dict(name="cache_s3", what="cache tokens/s to S3 (run time)", unit="tokens/s",
             baseline=dict(label="local, 1 proc", value=n / local_run_s),
             variant=dict(label="S3, 1 proc", value=n / s3_run), ratio=local_run_s / s3_run,
             check=dict(what="S3 objects = local files", ok=identical),
             info="to S3: one run after the rounds, against the best local 1-proc round", samples={"S3, 1 proc": [s3_run]}),
    ]


def same_objects(server: S3Server, prefix: str, local: Path) -> bool:
    """The objects under s3://BUCKET/prefix/ are the local store's files, byte for byte."""
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix + "/") for o in page.get("Contents", [])]
    remote = {k.removeprefix(prefix + "/") for k in keys}
    here = files(local)
    return remote == here.keys() and all(
        client.get_object(Bucket=BUCKET, Key=f"{prefix}/{k}")["Body"].read()
        == here[k].read_bytes() for k in here)


# --- 4. objects and bytes: sharded vs one chunk per object -------------------------------------

def bench_objects(work: Path, size: dict, model: Path, tokens: Path, hook: str, sharded: Path
                  ) -> list[dict]:
    flat = fresh(work / "cache-chunk-per-object")
    wall, _, _ = timed(launch("cache-acts", cache_args(size, model, tokens, hook, str(flat),
                                                       "--shard-rows", str(size["chunk_rows"])),
                              1), env(2), size["timeout"])
    say(f"cache with --shard-rows {size['chunk_rows']}: wall {wall:.1f}s")
    a, b = zarr.open_group(str(flat), mode="r"), zarr.open_group(str(sharded), mode="r")
    arrays = [f"acts/{hook}", "token_ids", "seq_index", "position"]
    same = all(np.array_equal(a[p][...], b[p][...]) for p in arrays)
    count = {k: len(files(p)) for k, p in (("flat", flat), ("sharded", sharded))}
    nbytes = {k: sum(f.stat().st_size for f in files(p).values())
              for k, p in (("flat", flat), ("sharded", sharded))}
    shard_rows = b.attrs["manifest"].get("shard_rows")
    check = dict(what="same rows in every array", ok=same)
    labels = (f"shard-rows {size['chunk_rows']}", f"shard-rows {shard_rows}")
    return [
        dict(name="objects", what="store files", unit="files",
             baseline=dict(label=labels[0], value=count["flat"]),
             variant=dict(label=labels[1], value=count["sharded"]),
             ratio=count["sharded"] / count["flat"], check=check),
        dict(name="bytes", what="store bytes", unit="bytes",
             baseline=dict(label=labels[0], value=nbytes["flat"]),
             variant=dict(label=labels[1], value=nbytes["sharded"]),
             ratio=nbytes["sharded"] / nbytes["flat"], check=check),
    ]


# --- the table ---------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    """One line per measurement: what, baseline, variant, ratio (variant / baseline), check;
    the notes as numbered footnotes."""
    lines = [f"{'measurement':<35} {'baseline':<31} {'variant':<31} {'ratio':>6}  check"]
    notes: list[str] = []
    for r in results:
        b, v = r["baseline"], r["variant"]
        ref = ""
        if r.get("info"):
            if r["info"] not in notes:
                notes.append(r["info"])
            ref = f" [{notes.index(r['info']) + 1}]"
        lines.append(f"{r['what']:<35} {b['label']:<17}{b['value']:>12,.0f}   "
                     f"{v['label']:<18}{v['value']:>13,.0f} {r['ratio']:>6.3f}  "
                     f"{'ok' if r['check']['ok'] else 'FAILED'}: {r['check']['what']}{ref}")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (< 60 s), for a test")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_scale",
                    help="folder for bench_scale.json (and the stores, under work/)")
    ap.add_argument("--tokens", type=int, help="tokens to cache (default 196608; quick 4096)")
    ap.add_argument("--sweep-tokens", type=int, help="tokens per sweep (default 32768)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds of the process runs (3)")
    ap.add_argument("--loader-rounds", type=int, help="interleaved loader passes (3)")
    ap.add_argument("--keep", action="store_true", help="keep the stores and sweeps in OUT/work")
    a = ap.parse_args()
    size = dict(QUICK if a.quick else FULL)
    for key in ("tokens", "sweep_tokens", "rounds", "loader_rounds"):
        if getattr(a, key) is not None:
            size[key] = getattr(a, key)
    out = a.out.resolve()
    work = fresh(out / "work")
    work.mkdir(parents=True)
    hook = f"blocks.{size['model']['n_layers'] - 1}.hook_resid_post"
    say(f"{'quick' if a.quick else 'full'}: {size['tokens']:,} tokens of context "
        f"{size['context']} through {size['model']['n_layers']} layers of d_model "
        f"{size['model']['d_model']} at {hook}; sweeps of {size['sweep_tokens']:,} tokens; "
        f"{os.cpu_count()} CPUs; best of {size['rounds']} interleaved rounds")
    load_start = os.getloadavg()  # others' processes on this machine skew every figure
    model, tokens = write_inputs(work, size)
    results, local = bench_cache(work, size, model, tokens, hook, size["rounds"])
    results += bench_sweep(work, size, local, size["rounds"])
    results += bench_loader(work, size, model, tokens, hook, local,
                            min(results[0]["samples"]["1 proc x 2 thr"]), size["loader_rounds"])
    results += bench_objects(work, size, model, tokens, hook, local)
    doc = dict(quick=a.quick, size=size, hook=hook, cpus=os.cpu_count(),
               load_average={"start": load_start, "end": os.getloadavg()},
               seconds=time.perf_counter() - T0, measurements=results,
               all_checks_ok=all(r["check"]["ok"] for r in results))
    (out / "bench_scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    if not a.keep:
        shutil.rmtree(work)
    print()
    print(table(results))
    print(f"\n{len(results)} measurements in {doc['seconds']:.0f}s (1-min load average "
          f"{load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
          f"{os.cpu_count()} CPUs) -> {out / 'bench_scale.json'}")
    if not doc["all_checks_ok"]:
        raise SystemExit("error: an identity check failed (see the table)")


if __name__ == "__main__":
    main()
