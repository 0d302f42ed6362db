"""GRPO rollouts: G completions per prompt from the KV-cache engine (tokens and the log-probs of
the temperature-scaled distribution they were sampled from), scored by each problem's reward,
shaped for overlong answers (DAPO, in tokens), and filtered by dynamic sampling with refill.

Dynamic sampling (DAPO, SPEC.md §4b): a group whose rewards are all equal has zero advantage
everywhere and carries no gradient. `collect_groups` drops such groups and keeps drawing rounds
of `groups_per_step` fresh prompts (every round the same shape, so generation compiles once)
until `groups_per_step` informative groups are held or `max_rounds` rounds are spent; then the
step trains on what it has and the counts say so.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from glm_jax.data.tasks import Problem
from glm_jax.infer.engine import SamplingConfig
from glm_jax.rl.evaluate import sample_completions, score_samples
from glm_jax.rl.objectives import overlong_penalty
from glm_jax.rl.rewards import RewardPool

ZERO_STD = 1e-6  # a group with reward std below this carries no signal


@dataclasses.dataclass(frozen=True)
class Groups:
    """Rollout rows, `group_size` consecutive rows per problem."""
    problems: tuple[Problem, ...]  # one per group
    group_size: int
    prompts: tuple[tuple[int, ...], ...]  # per row
    completions: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[float, ...], ...]
    truncated: np.ndarray  # [rows] bool
    scores: np.ndarray  # [rows] the rewards as scored
    rewards: np.ndarray  # [rows] after overlong shaping: what the advantages use
    # routing replay: per row the rollout's expert ids [tokens, MoE layers, k], or None
    routing: tuple[np.ndarray, ...] | None = None
    # multi-turn episodes: per row, per completion token, 1 where the model generated it and 0
    # where the environment inserted it (glm_jax.rl.agentic); None = every token the model's
    completion_masks: tuple[tuple[int, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.problems)

    def informative(self) -> np.ndarray:
        """[groups] bool: the group's shaped rewards are not all equal."""
        if not len(self):
            return np.zeros(0, bool)
        return self.rewards.reshape(len(self), self.group_size).std(axis=1) > ZERO_STD

    def model_tokens(self) -> list[int]:
        """[rows] the completion tokens the model generated (observations left out)."""
        if self.completion_masks is None:
            return [len(c) for c in self.completions]
        return [sum(m) for m in self.completion_masks]

    def select(self, groups: Sequence[int]) -> "Groups":
        rows = [g * self.group_size + j for g in groups for j in range(self.group_size)]
        pick = lambda seq: tuple(seq[r] for r in rows)
        return Groups(tuple(self.problems[g] for g in groups), self.group_size,
                      pick(self.prompts), pick(self.completions), pick(self.logprobs),
                      self.truncated[rows], self.scores[rows], self.rewards[rows],
                      None if self.routing is None else pick(self.routing),
                      completion_masks=(None if self.completion_masks is None
                                        else pick(self.completion_masks)))

    @classmethod
    def concat(cls, parts: Sequence["Groups"], group_size: int) -> "Groups":
        if not parts:
            empty = np.zeros(0, np.float32)
            return cls((), group_size, (), (), (), np.zeros(0, bool), empty, empty)
        join = lambda name: sum((getattr(p, name) for p in parts), ())
        stack = lambda name: np.concatenate([getattr(p, name) for p in parts])
        routed = all(p.routing is not None for p in parts)
        masks = None
        if any(p.completion_masks is not None for p in parts):
            masks = sum((p.completion_masks if p.completion_masks is not None else
                         tuple((1,) * len(c) for c in p.completions) for p in parts), ())
        return cls(join("problems"), group_size, join("prompts"), join("completions"),
                   join("logprobs"), stack("truncated"), stack("scores"), stack("rewards"),
                   join("routing") if routed else None, completion_masks=masks)


@dataclasses.dataclass(frozen=True)
class Overlong:
    """DAPO's soft overlong punishment added to the reward: lengths in tokens, the ramp over the
    last `cache_len` tokens before `max_len` (the rollout's max_new_tokens)."""
    max_len: int
    cache_len: int

    def shape(self, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        penalty = overlong_penalty(lengths, max_len=self.max_len, cache_len=self.cache_len)
        return (rewards + np.asarray(penalty)).astype(np.float32)


def rollout_groups(model, tokenizer, problems: Sequence[Problem], pool: RewardPool, *,
                   group_size: int, sampling: SamplingConfig, thinking: bool = True,
                   max_new_tokens: int, batch_size: int, seed: int,
                   overlong: Overlong | None = None, record_routing: bool = False) -> Groups:
    """`group_size` sampled completions of each problem, scored (and shaped when `overlong`);
    `record_routing` keeps every row's selected experts (routing replay)."""
    samples = sample_completions(model, tokenizer, problems, n=group_size, sampling=sampling,
                                 thinking=thinking, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, seed=seed, record_routing=record_routing)
    scores = score_samples(samples, pool)
    rewards = scores
    if overlong is not None:
        lengths = np.asarray([len(c) for c in samples.token_ids], np.float32)
        rewards = overlong.shape(scores, lengths)
    return Groups(tuple(problems), group_size, samples.prompts, samples.token_ids,
                  samples.logprobs, np.asarray(samples.truncated, bool), scores, rewards,
                  samples.routing)


def collect_groups(draw: Callable[[int], list[Problem]], rollout: Callable[[list, int], Groups],
                   *, groups_per_step: int, max_rounds: int = 1,
                   dynamic: bool = True) -> tuple[Groups, dict[str, float], list[Groups]]:
    """-> (the groups to train on, counts, every round's rollouts).

    Each round draws `groups_per_step` prompts (`draw(n)`) and rolls them out
    (`rollout(problems, round)`). Without `dynamic`, one round and every group is kept. With it,
    all-equal groups are dropped and rounds repeat until `groups_per_step` groups are kept or
    `max_rounds` is reached; extra informative groups of the last round are left out."""
    if groups_per_step < 1 or max_rounds < 1:
        raise ValueError(f"need groups_per_step >= 1 and max_rounds >= 1, got "
                         f"{groups_per_step} and {max_rounds}")
    kept, rounds, group_size = [], [], None
    held = 0
    for index in range(max_rounds if dynamic else 1):
        groups = rollout(draw(groups_per_step), index)
        group_size = groups.group_size
        rounds.append(groups)
        if dynamic:
            useful = np.flatnonzero(groups.informative())[:groups_per_step - held]
            groups = groups.select(useful.tolist())
        kept.append(groups)
        held += len(groups)
        if held >= groups_per_step:
            break
    sampled = sum(len(r) for r in rounds)
    zero_std = sum(int((~r.informative()).sum()) for r in rounds)
    counts = dict(rounds=len(rounds), groups_sampled=sampled, groups_kept=held,
                  zero_std_group_frac=zero_std / sampled,
                  groups_short=groups_per_step - held)
    return Groups.concat(kept, group_size), counts, rounds
