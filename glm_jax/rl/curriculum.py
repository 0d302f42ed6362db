"""GLM-4.5's two-stage difficulty curriculum (SPEC.md §4): stage 1 trains on moderate prompts;
stage 2 on the extreme ones, those the policy never solves in 8 samples but does solve
sometimes in 512 (`select_hard_prompts`). Pass rates come from `pass_at_k` over n samples.
And the report's dynamic temperature: when the reward plateaus, score a held-out set over a
range of temperatures and continue at `pick_temperature(...)`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np


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


def plateaued(values: Sequence[float], *, window: int, min_delta: float = 0.01) -> bool:
    """Whether a reward stopped rising: the mean of the last `window` values exceeds the mean
    of the `window` before by less than `min_delta` (absolute). False until there are
    2 x `window` values, so a trigger never fires on a too-short history."""
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"plateaued needs an integer window >= 1, got {window!r}")
    if len(values) < 2 * window:
        return False
    recent = np.mean(values[-window:])
    before = np.mean(values[-2 * window:-window])
    return bool(recent - before < min_delta)


class PassCountCache:
    """Per-prompt sample counts on disk: JSON lines `{"key", "policy_step", "n", "correct"}`,
    appended (and flushed) as each chunk of prompts is scored, so an estimate that is stopped
    resumes where it stopped. A line for another policy step or sample count is not reused;
    a partly written last line (a kill mid-write) is ignored."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self, policy_step: int, n: int) -> dict[str, int]:
        out = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("policy_step") == policy_step and record.get("n") == n:
                out[record["key"]] = int(record["correct"])
        return out

    def append(self, policy_step: int, n: int, counts: Mapping[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # end a partly written line, so the next record starts on its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            for key, correct in counts.items():
                f.write((json.dumps({"key": key, "policy_step": policy_step, "n": n,
                                     "correct": int(correct)}) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def count_correct(keys: Sequence[str], sample: Callable[[list[str], int], np.ndarray], *,
                  n: int, cache: PassCountCache, policy_step: int,
                  chunk: int = 64) -> dict[str, int]:
    """-> {key: completions with reward 1 out of n}, for every key. `sample(keys, index)` returns
    the rewards of n completions per key (key-major) of chunk `index` of the key list. A chunk
    whose keys are all cached for this policy step and n is not sampled again; each chunk is
    cached as soon as it is scored. Chunks are fixed slices of `keys`, so a caller seeding by
    chunk index draws the same samples whether or not the estimate was stopped on the way."""
    keys = list(dict.fromkeys(keys))
    known = cache.load(policy_step, n)
    for index, start in enumerate(range(0, len(keys), chunk)):
        part = keys[start:start + chunk]
        if all(k in known for k in part):
            continue
        rewards = np.asarray(sample(part, index), np.float32).reshape(len(part), n)
        counts = dict(zip(part, (rewards >= 1.0).sum(axis=1).tolist()))
        cache.append(policy_step, n, counts)
        known.update(counts)
    return {k: known[k] for k in keys}


def select_moderate_prompts(correct: Mapping[str, int], n: int, *, low: float = 0.0,
                            high: float = 1.0) -> list[str]:
    """Stage 1: the prompts whose pass rate c / n lies strictly between `low` and `high` (by
    default: solved sometimes, not always), in the order given."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"select_moderate_prompts needs 0 <= low < high <= 1, got {low}, {high}")
    return [k for k, c in correct.items() if low < c / n < high]
