"""Stage 1: run a model once and write exactly, globally shuffled activations to a Zarr v3 store."""
