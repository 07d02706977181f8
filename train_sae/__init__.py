"""Stage 2: train many SAEs in one pass over an activation store, evaluate and report them."""
