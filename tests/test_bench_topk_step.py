"""pipelines/bench/topk_step.py at tiny sizes: every variant runs, the ratios and goals print, and
the dense variants and the L1 step are skipped above --skip-dense-above."""

from __future__ import annotations

import torch

from pipelines.bench.topk_step import main


def test_topk_step_benchmark_tiny(capsys):
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            main(["--d-in", "16", "--widths", "64,128", "--k", "4", "--batch-size", "32",
                  "--rounds", "1", "--threads", "1", "--skip-dense-above", "64",
                  "--goal-width", "64"])
    finally:
        torch.set_num_threads(threads)  # main sets them for the whole process
    out = capsys.readouterr().out
    for line in ("TopK step, width 64\n", "dense variants skipped: width > 64",
                 "L1 (relu) step, width 64\n", "L1 (relu) step, width 128: skipped",
                 "ours sparse / bare sparse = ", "ours dense / bare dense = ",
                 "ours relu / bare dense = ", "goal ours sparse / bare sparse <= 1.2 at width 64"):
        assert line in out, line
    assert out.count("ours dense / bare dense") == 1  # width 128: no dense variants
    assert ("SAELens (faster) / ours sparse" in out) != ("SAELens: skipped" in out)
