"""Dynamic sampling with refill, overlong shaping in tokens, the prompt stream, presets and the
padded training batch: host-side logic, checked with scripted rollouts (no model)."""

import numpy as np
import pytest

from glm_jax.data import tasks
from glm_jax.errors import ConfigError
from glm_jax.rl.loop import PRESETS, PromptStream, _padded_batch, grpo_base_config, grpo_config
from glm_jax.rl.rollouts import Groups, Overlong, collect_groups

G = 4


def _groups(problems, rewards, lengths=None) -> Groups:
    rows = len(problems) * G
    rewards = np.asarray(rewards, np.float32).reshape(rows)
    lengths = lengths or [3] * rows
    completions = tuple(tuple(range(1, n + 1)) for n in lengths)
    return Groups(tuple(problems), G, tuple((7, 8) for _ in range(rows)), completions,
                  tuple(tuple([-0.5] * n) for n in lengths), np.zeros(rows, bool), rewards,
                  rewards)


class Scripted:
    """rollout(problems, round) whose rewards per group come from a script, one list per round."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, problems, round_index):
        self.calls.append((len(problems), round_index))
        per_group = self.script[round_index]
        rewards = [r for group in per_group for r in group]
        return _groups(problems, rewards)


def _draw():
    stream = PromptStream(tasks.problems("train", 50), seed=0)
    return stream


informative, flat_0, flat_1 = [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]


def test_all_equal_groups_dropped_and_refilled_until_enough():
    rollout = Scripted([[informative, flat_0, flat_1],
                        [flat_1, informative, flat_0],
                        [informative, informative, informative]])
    stream = _draw()
    kept, counts, rounds = collect_groups(stream.draw, rollout, groups_per_step=3, max_rounds=5)
    assert len(kept) == 3 and kept.informative().all()
    assert rollout.calls == [(3, 0), (3, 1), (3, 2)]  # every round the same shape
    # round 0 gives 1, round 1 gives 1, round 2 gives 3 of which 1 is needed
    assert counts == dict(rounds=3, groups_sampled=9, groups_kept=3,
                          zero_std_group_frac=pytest.approx(4 / 9), groups_short=0)
    assert stream.position == 9 and len(rounds) == 3
    kept_ids = [p.key for p in kept.problems]
    assert kept_ids == [rounds[0].problems[0].key, rounds[1].problems[1].key,
                        rounds[2].problems[0].key]


def test_refill_is_bounded_and_short_batches_are_counted():
    rollout = Scripted([[flat_0, flat_0], [flat_1, informative], [informative, informative]])
    kept, counts, _ = collect_groups(_draw().draw, rollout, groups_per_step=2, max_rounds=2)
    assert len(rollout.calls) == 2  # stopped at max_rounds although round 2 would have helped
    assert len(kept) == 1 and counts["groups_short"] == 1 and counts["rounds"] == 2
    assert counts["zero_std_group_frac"] == pytest.approx(3 / 4)


def test_without_dynamic_sampling_every_group_is_kept():
    rollout = Scripted([[flat_0, informative, flat_1]])
    kept, counts, _ = collect_groups(_draw().draw, rollout, groups_per_step=3, max_rounds=4,
                                     dynamic=False)
    assert len(kept) == 3 and counts["rounds"] == 1 and counts["groups_kept"] == 3
    assert counts["zero_std_group_frac"] == pytest.approx(2 / 3)


def test_no_informative_group_gives_an_empty_batch():
    rollout = Scripted([[flat_0], [flat_1]])
    kept, counts, _ = collect_groups(_draw().draw, rollout, groups_per_step=1, max_rounds=2)
    assert len(kept) == 0 and kept.prompts == () and counts["groups_short"] == 1


def test_overlong_shaping_counts_tokens():
    shaping = Overlong(max_len=10, cache_len=4)
    lengths = np.array([3, 6, 8, 10, 12], np.float32)  # tokens, not characters
    shaped = shaping.shape(np.ones(5, np.float32), lengths)
    np.testing.assert_allclose(shaped, [1.0, 1.0, 0.5, 0.0, 0.0])
    # shaping can make an all-correct group informative (different lengths)
    groups = _groups(tasks.problems("train", 1), [1, 1, 1, 1], lengths=[3, 3, 3, 9])
    groups = Groups(groups.problems, G, groups.prompts, groups.completions, groups.logprobs,
                    groups.truncated, groups.scores,
                    shaping.shape(groups.scores, np.array([3, 3, 3, 9], np.float32)))
    assert groups.informative().tolist() == [True]


def test_prompt_stream_resumes_from_its_position_and_reshuffles_each_epoch():
    problems = tasks.problems("train", 7)
    stream = PromptStream(problems, seed=3)
    first = [p.key for p in stream.draw(10)]
    resumed = PromptStream(problems, seed=3, position=4)
    assert [p.key for p in resumed.draw(6)] == first[4:]
    epoch0 = first[:7]
    assert sorted(epoch0) == sorted(p.key for p in problems)  # each epoch is a permutation


def test_presets_and_aggregation_auto():
    assert set(PRESETS) == {"grpo", "dapo", "dr_grpo"}
    dapo = grpo_base_config("dapo").rl
    assert (dapo.eps_low, dapo.eps_high, dapo.aggregation) == (0.2, 0.28, "token-mean")
    assert dapo.dynamic_sampling and dapo.overlong_cache > 0
    dr = grpo_base_config("dr_grpo").rl
    assert not dr.scale_by_std and dr.aggregation == "seq-mean-token-scale"
    config = grpo_base_config("grpo")
    assert config.rl.kl_beta == 0 and not config.rl.dynamic_sampling
    math_problems = tasks.problems("train", 3, kinds=("add",))
    assert grpo_config(config, math_problems).aggregation == "seq-mean-token-mean"
    code = [tasks.Problem(key="c", kind="code", prompt="p", reasoning="", answer="",
                          reward="code", reference={"tests": []})]
    assert grpo_config(config, code).aggregation == "token-mean"
    with pytest.raises(ConfigError, match="presets"):
        grpo_base_config("ppo")


def test_short_batches_are_padded_to_the_fixed_shape_with_empty_rows():
    config = grpo_base_config()
    config.rl.group_size, config.rl.groups_per_step, config.seq_len = G, 3, 16
    config.micro_batches = 2
    groups = _groups(tasks.problems("train", 2), [1, 0, 0, 0, 1, 1, 0, 0])
    batch = _padded_batch(groups, np.arange(8, dtype=np.float32), config, temperature=0.7)
    assert batch["mask"].shape == (2, 6, 16)  # 3 groups x 4 rows in 2 micro-batches
    assert batch["temperature"] == np.float32(0.7)
    mask = batch["mask"].reshape(12, 16)
    assert mask[:8].sum(axis=1).tolist() == [3.0] * 8  # the completion tokens
    assert mask[8:].sum() == 0 and batch["advantages"].reshape(12)[8:].tolist() == [0.0] * 4
