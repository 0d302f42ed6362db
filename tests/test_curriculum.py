"""The curriculum's stage-1 and stage-2 rules and the dynamic-temperature rule on hand cases,
ties, bad input, and (hypothesis) against a direct re-statement over random tables; the pass-count
cache that lets a stopped estimate resume; the plateau rule and the triggers built on it."""

import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from glm_jax.rl import pass_at_k, pick_temperature, select_hard_prompts
from glm_jax.rl.curriculum import (PassCountCache, count_correct, plateaued,
                                   select_moderate_prompts)
from glm_jax.rl.loop import _switch_now, _tune_now, grpo_base_config


def test_select_hard_prompts_keeps_unsolved_at_8_but_solved_at_512():
    rates = {"easy": {8: 0.9, 512: 1.0}, "hard": {8: 0.0, 512: 0.3}, "never": {8: 0.0, 512: 0.0},
             "moderate": {8: 0.2, 512: 1.0}, "barely": {8: 0.0, 512: 1e-9}}
    assert select_hard_prompts(rates) == ["hard", "barely"]  # the order given
    other_k = {"a": {4: 0.0, 16: 0.5}, "b": {4: 0.5, 16: 0.9}, "c": {4: 0.0, 16: 0.0}}
    assert select_hard_prompts(other_k, zero_at=4, nonzero_at=16) == ["a"]


def test_select_hard_prompts_from_sample_counts():
    # From one set of 512 samples the unbiased pass@8 is > 0 exactly when pass@512 is, so the
    # rule keeps nothing: it needs pass@8 from its own 8 samples (the cheap first screen).
    counts = {"p0": 0, "p1": 1, "p2": 40}
    rates = {p: {k: pass_at_k(512, c, k) for k in (8, 512)} for p, c in counts.items()}
    assert rates["p1"][8] > 0 and rates["p1"][512] == 1.0
    assert select_hard_prompts(rates) == []
    measured = {"p0": {8: pass_at_k(8, 0, 8), 512: pass_at_k(512, 0, 512)},
                "p1": {8: pass_at_k(8, 0, 8), 512: pass_at_k(512, 1, 512)},
                "p2": {8: pass_at_k(8, 3, 8), 512: pass_at_k(512, 40, 512)}}
    assert select_hard_prompts(measured) == ["p1"]


@pytest.mark.parametrize("rates, kwargs, message", [
    ({"a": {8: 0.0}}, {}, "prompt 'a': no pass@512 (has [8])"),
    ({"a": {8: 0.0, 512: 1.5}}, {}, "prompt 'a': pass@512 = 1.5 is not in [0, 1]"),
    ({"a": {8: float("nan"), 512: 1.0}}, {}, "prompt 'a': pass@8 = nan is not in [0, 1]"),
    ({}, dict(zero_at=512, nonzero_at=8), "1 <= zero_at < nonzero_at"),
    ({}, dict(zero_at=0, nonzero_at=8), "1 <= zero_at < nonzero_at"),
])
def test_select_hard_prompts_bad_input_names_it(rates, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        select_hard_prompts(rates, **kwargs)


def test_pick_temperature_hand_cases_and_ties():
    assert pick_temperature({0.6: 0.50, 0.8: 0.52, 1.0: 0.515, 1.2: 0.40}) == 1.0  # 0.515 >= 0.5148
    assert pick_temperature({0.6: 0.50, 0.8: 0.52, 1.0: 0.514, 1.2: 0.40}) == 0.8  # 0.514 < 0.5148
    assert pick_temperature({0.7: 0.3, 1.0: 0.3, 1.3: 0.3}) == 1.3  # ties: the hottest
    assert pick_temperature({1.0: 1.0, 1.1: 0.99}) == 1.1  # exactly 1% below: within
    assert pick_temperature({0.5: 0.0, 1.0: 0.0}) == 1.0  # all zero: all within
    assert pick_temperature({0.5: -0.10, 1.0: -0.1005, 1.5: -0.2}) == 1.0  # negative rewards
    assert pick_temperature({0.6: 0.50, 0.8: 0.52, 1.0: 0.515}, tolerance=0.0) == 0.8
    assert pick_temperature({0.9: 0.2}) == 0.9


@pytest.mark.parametrize("scores, kwargs, message", [
    ({}, {}, "at least one"),
    ({1.0: float("nan")}, {}, "temperature 1.0: score nan is not finite"),
    ({0.0: 0.5}, {}, "temperature 0.0: must be a finite number > 0"),
    ({1.0: 0.5}, dict(tolerance=1.5), "tolerance must be in"),
])
def test_pick_temperature_bad_input_names_it(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pick_temperature(scores, **kwargs)


@given(st.dictionaries(st.sampled_from([0.2 * i for i in range(1, 11)]),
                       st.floats(-1, 1, allow_nan=False), min_size=1),
       st.sampled_from([0.0, 0.01, 0.05, 0.5]))
def test_pick_temperature_is_the_hottest_within_tolerance(scores, tolerance):
    best = max(scores.values())
    picked = pick_temperature(scores, tolerance=tolerance)
    assert scores[picked] >= best - tolerance * abs(best) - 1e-9
    hotter = [t for t in scores if t > picked]
    assert all(scores[t] < best - tolerance * abs(best) + 1e-9 for t in hotter)
    assert math.isfinite(picked)


class Sampler:
    """sample(keys) -> n rewards per key from a table; optionally fails on the k-th call."""

    def __init__(self, table, n, fail_on_call=None):
        self.table, self.n, self.fail_on_call, self.calls = table, n, fail_on_call, []

    def __call__(self, keys, index):
        self.calls.append((index, list(keys)))
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # the run is stopped mid-estimate
        return np.concatenate([[1.0] * self.table[k] + [0.0] * (self.n - self.table[k])
                               for k in keys])


def test_pass_counts_are_cached_and_an_interrupted_estimate_resumes(tmp_path):
    table = {f"p{i}": i % 5 for i in range(10)}  # correct out of n = 4 (p4, p9: 4 of 4)
    table.update(p4=4, p9=0)
    cache = PassCountCache(tmp_path / "pass_counts.jsonl")
    stopped = Sampler(table, 4, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        count_correct(list(table), stopped, n=4, cache=cache, policy_step=0, chunk=4)
    assert len(cache.load(0, 4)) == 4  # the first chunk was kept
    with open(cache.path, "a") as f:
        f.write('{"key": "p5", "policy_st')  # a kill mid-write
    resumed = Sampler(table, 4)
    counts = count_correct(list(table), resumed, n=4, cache=cache, policy_step=0, chunk=4)
    assert counts == table
    # the second and third chunks; the first is cached, the stopped one is sampled whole
    assert resumed.calls == [(1, ["p4", "p5", "p6", "p7"]), (2, ["p8", "p9"])]
    again = Sampler(table, 4)
    assert count_correct(list(table), again, n=4, cache=cache, policy_step=0) == table
    assert again.calls == []  # all cached
    later = Sampler(table, 4)
    count_correct(["p1"], later, n=4, cache=cache, policy_step=50)  # a newer policy: resampled
    assert later.calls == [(0, ["p1"])]
    assert cache.load(0, 8) == {}  # another sample count is not reused


def test_stage_one_keeps_the_moderate_prompts():
    correct = {"never": 0, "once": 1, "half": 4, "always": 8}
    assert select_moderate_prompts(correct, 8) == ["once", "half"]
    assert select_moderate_prompts(correct, 8, low=0.2, high=1.0) == ["half"]
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        select_moderate_prompts(correct, 8, low=0.5, high=0.5)


def test_plateaued_compares_the_last_window_with_the_one_before():
    assert not plateaued([0.1, 0.2, 0.3], window=2)  # fewer than 2 x window values
    assert not plateaued([0.1, 0.2, 0.4, 0.5], window=2)  # 0.45 - 0.15 >= 0.01
    assert plateaued([0.1, 0.5, 0.3, 0.3], window=2)  # 0.3 - 0.3 < 0.01
    assert plateaued([0.5, 0.4], window=1)  # a fall is a plateau too
    assert plateaued([0.3, 0.305], window=1, min_delta=0.01)
    assert not plateaued([0.3, 0.305], window=1, min_delta=0.0)
    with pytest.raises(ValueError, match="window >= 1"):
        plateaued([0.1, 0.2], window=0)


def test_stage_switch_and_temperature_triggers():
    config = grpo_base_config("grpo")
    cur, dynamic = config.rl.curriculum, config.rl.dynamic_temperature
    history = {"train_rewards": [0.2, 0.3, 0.3, 0.3], "eval_rewards": [0.3, 0.4]}
    cur.switch_step = 7
    assert not _switch_now(3, history, config)  # no plateau trigger configured
    assert _switch_now(7, history, config)
    cur.plateau_window = 2
    assert not _switch_now(4, history, config)  # rose 0.3 - 0.25 = 0.05 >= 0.01
    cur.plateau_window = 1
    assert _switch_now(4, history, config)  # 0.3 - 0.3 < 0.01
    assert not _tune_now(10, history, config)  # both triggers off
    dynamic.every = 5
    assert _tune_now(10, history, config) and not _tune_now(11, history, config)
    dynamic.plateau_window = 1
    assert not _tune_now(11, history, config)  # held-out rose 0.1
    history["eval_rewards"].append(0.4)
    assert _tune_now(11, history, config)
