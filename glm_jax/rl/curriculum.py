"""GLM-4.5's two-stage difficulty curriculum (SPEC.md §4): stage 1 trains on moderate prompts;
stage 2 on the extreme ones, those the policy never solves in 8 samples but does solve
sometimes in 512 (`select_hard_prompts`). Pass rates come from `pass_at_k` over n samples.
And the report's dynamic temperature: when the reward plateaus, score a held-out set over a
range of temperatures and continue at `pick_temperature(...)`."""

from __future__ import annotations

import math
from typing import Mapping


def select_hard_prompts(pass_rates: Mapping[str, Mapping[int, float]], *, zero_at: int = 8,
                        nonzero_at: int = 512) -> list[str]:
    """The prompts (in the order given) with pass@`zero_at` = 0 and pass@`nonzero_at` > 0.

    `pass_rates[prompt][k]` is the prompt's pass@k. pass@k never falls as k grows, so the rule
    needs `zero_at < nonzero_at`; a prompt missing either k, or a rate outside [0, 1], is an
    error naming it (a silently skipped prompt would shrink stage 2 unnoticed)."""
    if not (isinstance(zero_at, int) and isinstance(nonzero_at, int) and 1 <= zero_at < nonzero_at):
        raise ValueError(f"select_hard_prompts needs integers 1 <= zero_at < nonzero_at, got "
                         f"zero_at={zero_at!r}, nonzero_at={nonzero_at!r}")
    hard = []
    for prompt, rates in pass_rates.items():
        for k in (zero_at, nonzero_at):
            if k not in rates:
                raise ValueError(f"prompt {prompt!r}: no pass@{k} (has {sorted(rates)})")
            rate = rates[k]
            if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
                raise ValueError(f"prompt {prompt!r}: pass@{k} = {rate!r} is not in [0, 1]")
        if rates[zero_at] == 0.0 and rates[nonzero_at] > 0.0:
            hard.append(prompt)
    return hard


def pick_temperature(scores: Mapping[float, float], *, tolerance: float = 0.01) -> float:
    """GLM-4.5's dynamic temperature rule: the highest temperature whose held-out score is within
    `tolerance` (relative: 0.01 = 1%) of the best score. Exploring as hot as the score allows."""
    if not scores:
        raise ValueError("pick_temperature needs at least one (temperature, score)")
    if not (isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0):
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    for temperature, score in scores.items():
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature {temperature!r}: must be a finite number > 0")
        if not math.isfinite(score):
            raise ValueError(f"temperature {temperature}: score {score!r} is not finite")
    best = max(scores.values())
    floor = best - tolerance * abs(best)
    return max(t for t, s in scores.items() if s >= floor - 1e-12 * max(1.0, abs(best)))
