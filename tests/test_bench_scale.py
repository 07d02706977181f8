"""pipelines/bench_scale.sh --quick: every measurement is in the JSON with positive numbers, and
every identity check passed (2-rank store and weights equal to one process's, the S3 store
equal to the local one, the sharded and chunk-per-object stores holding the same rows).
Slow: seven tool runs of a few seconds each, 35-50 s on 2 cores."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NAMES = ["cache_run", "cache_wall", "sweep_wall", "sweep_train", "sweep_train_1thread", "loader",
         "cache_s3", "objects", "bytes"]


@pytest.mark.slow
def test_quick_scale_benchmark(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "pipelines" / "bench_scale.sh"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_scale.json").read_text())
    results = {r["name"]: r for r in doc["measurements"]}
    assert sorted(results) == sorted(NAMES)
    for name, r in results.items():
        assert r["baseline"]["value"] > 0 and r["variant"]["value"] > 0, name
        assert r["ratio"] > 0, name
        assert r["check"]["ok"] is True, (name, r["check"])
    assert doc["all_checks_ok"] is True
    assert results["objects"]["variant"]["value"] < results["objects"]["baseline"]["value"]
    assert not (tmp_path / "work").exists()  # the stores are removed unless --keep
    for r in doc["measurements"]:  # one table line per measurement
        assert sum(line.startswith(r["what"]) for line in run.stdout.splitlines()) >= 1
