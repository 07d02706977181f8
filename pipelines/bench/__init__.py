"""Benchmarks, run from the repo root: python -m pipelines.bench.train | .loader | .cache."""
