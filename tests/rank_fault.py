"""`python tests/rank_fault.py cache-acts ARGS...` under torchrun: `cache-acts` with one rank
made to fail, for tests of how the others stop. The fault is chosen by environment variables
read only here (the shipped code has no fault hooks):

    FAULT_RANK   the rank that fails
    FAULT        nan: its model outputs NaN (a user error: the refusal of non-finite values)
                 crash-pass-2: its 3rd chunk write raises RuntimeError (an internal error)
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    if os.environ.get("RANK") == os.environ["FAULT_RANK"]:
        fault = os.environ["FAULT"]
        if fault == "nan":
            from cache_acts import run

            real = run.capture

            def nan_capture(model, tokens, hooks):
                return {h: torch.full_like(a, float("nan")) for h, a in
                        real(model, tokens, hooks).items()}

            run.capture = nan_capture
        elif fault == "crash-pass-2":
            from cache_acts import engine

            real_write, calls = engine.write_chunk, [0]

            def crash(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 3:
                    raise RuntimeError("simulated crash in pass 2")
                return real_write(*args, **kwargs)

            engine.write_chunk = crash
        else:
            raise SystemExit(f"unknown FAULT {fault!r}")
    from cache_acts.cli import main as cache_main

    sys.argv = ["cache-acts", *sys.argv[2:]]
    cache_main()


if __name__ == "__main__":
    main()
