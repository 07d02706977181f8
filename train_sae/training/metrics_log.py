"""Training logs: one metrics.jsonl per member (always), W&B when asked, a tqdm progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_JSONL = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON line per logged step to `<member>/metrics.jsonl`.

    On resume the file is cut back to `truncate_to` bytes (its size at the checkpoint), so lines
    written after the checkpoint by the killed run are not duplicated.
    """

    def __init__(self, folder: Path, truncate_to: int | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / METRICS_JSONL
        if truncate_to is None:
            self.path.write_bytes(b"")
        else:
            with open(self.path, "ab") as f:
                f.truncate(truncate_to)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")

    def offset(self) -> int:
        self.file.flush()
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


class WandbSink:
    """One W&B run for the sweep; each member's metrics under `<member>/<metric>`.

    WANDB_MODE=offline works without an account. `run_id` lets a resumed sweep continue the run.
    """

    def __init__(self, project: str, name: str, config: dict[str, Any], folder: Path,
                 run_id: str | None = None):
        import wandb

        self.run = wandb.init(project=project, name=name, config=config, dir=str(folder),
                              id=run_id, resume="allow" if run_id else None)
        self.run_id: str = self.run.id

    def log(self, member: str, record: dict[str, Any], step: int) -> None:
        self.run.log({f"{member}/{k}": v for k, v in record.items() if k != "step"}, step=step)

    def finish(self) -> None:
        self.run.finish()


class Progress:
    """tqdm bar over tokens, with steps/s (the same smoothed rate as its tokens/s) and the best
    member's last logged FVU."""

    def __init__(self, total_tokens: int, start_tokens: int, tokens_per_step: int,
                 enabled: bool = True):
        self.bar = tqdm(total=total_tokens, initial=start_tokens, unit="tok", unit_scale=True,
                        dynamic_ncols=True, mininterval=1.0, desc="train", disable=not enabled)
        self.tokens_per_step = tokens_per_step
        self.t0 = time.perf_counter()
        self.steps = 0

    def update(self, best_fvu: float | None) -> None:
        self.steps += 1
        self.bar.update(self.tokens_per_step)
        if self.steps % 10 == 0 or best_fvu is not None:
            tokens_per_s = self.bar.format_dict.get("rate")  # tqdm's smoothed recent rate
            rate = (tokens_per_s / self.tokens_per_step if tokens_per_s
                    else self.steps / max(time.perf_counter() - self.t0, 1e-9))
            post = {"steps/s": f"{rate:.1f}"}
            if best_fvu is not None and math.isfinite(best_fvu):
                post["best_fvu"] = f"{best_fvu:.4f}"
            self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()
