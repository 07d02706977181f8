"""Learning-rate schedule of one sweep member, a pure function of the step (so resume is exact).

    factor(step) = warm-up factor x decay factor
    warm-up: cosine from `warmup_start` (1/10) to 1 over `warmup_steps`, starting at step 0 and again
             at every step in `rewarm_at` (after each Anthropic resampling; seed 003, trick 3);
    decay:   linear to 0 over the final `decay_frac` of training (seed 004, April update: last 20%).
(The April-update L1 warm-up is part of the loss and lives in `train_sae/dictionaries/april.py`.)
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_frac: float = 0.0
    rewarm_at: tuple[int, ...] = ()  # sorted steps at which the LR drops to 1/10 and warms up again
    warmup_start: float = 0.1

    def factor(self, step: int) -> float:
        f = 1.0
        if self.warmup_steps > 0:
            i = bisect.bisect_right(self.rewarm_at, step)
            origin = self.rewarm_at[i - 1] if i > 0 else 0
            t = step - origin
            if t < self.warmup_steps:
                # cosine ramp (Conmy, seed 003): warmup_start at t = 0, 1 at t = warmup_steps
                ramp = 0.5 * (1.0 - math.cos(math.pi * t / self.warmup_steps))
                f = self.warmup_start + (1.0 - self.warmup_start) * ramp
        decay_steps = int(round(self.decay_frac * self.total_steps))
        if decay_steps > 0 and step >= self.total_steps - decay_steps:
            f *= (self.total_steps - step) / decay_steps
        return f

    def lr(self, step: int) -> float:
        return self.base_lr * self.factor(step)
