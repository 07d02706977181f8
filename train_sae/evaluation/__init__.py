"""Evaluation: splice evaluation, metrics (SAEs and crosscoders), `train-sae eval` over a sweep, and the report."""
