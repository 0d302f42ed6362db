"""Multi-turn rollouts: the policy and a tool environment (`glm_jax.rl.environments`) take turns.

An episode starts from the problem's prompt (with the environment's first observation, if any,
as an `<|observation|>` turn). Each model turn is generated up to a stop token and read by
`parse_output`: its tool calls go to `env.step`, whose observation the chat template renders as
an `<|observation|>` turn followed by the next `<|assistant|>` generation prompt; a turn without
tool calls is the final answer, scored by the problem's reward. An episode in which the model
never calls a tool is exactly a single-turn rollout.

The row's completion is every token after the initial prompt. Its mask is 1 on the tokens the
model generated (the stop token that ends each turn included, as in SFT) and 0 on the tokens the
environment's turn inserted, whose log-probs are 0: the policy is trained on what it wrote only.

An episode ends with reward 0, counted in `EpisodeStats`, on a turn `parse_output` rejects
(malformed), an environment that raises or answers with anything but (str, bool, number), tool
calls on the `max_turns`-th turn, or tool calls once the token budget is spent (the last two
truncated). An environment's `done` ends it with the environment's reward.

`max_new_tokens` bounds the whole completion (model and observation tokens), so a row fits the
training width a single-turn row does. Every round of turns generates in batches of
`batch_size` rows (the last padded with repeats), so generation compiles once per shape bucket.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from glm_jax.data.tasks import Problem, prompt_messages
from glm_jax.infer.chat import parse_output, render_chat, render_chat_parts
from glm_jax.infer.engine import SamplingConfig, generate
from glm_jax.rl.environments import ENVIRONMENTS, Environment
from glm_jax.rl.evaluate import Samples, stop_ids
from glm_jax.rl.rewards import RewardPool
from glm_jax.rl.rollouts import Groups, Overlong, rollout_groups


@dataclasses.dataclass
class EpisodeStats:
    """Counts over the episodes played (accumulated across calls)."""
    episodes: int = 0
    turns: int = 0  # model turns
    tool_calls: int = 0
    malformed: int = 0  # turns parse_output rejected: reward 0
    env_errors: int = 0  # the environment raised or answered badly: reward 0
    turn_limit: int = 0  # still calling tools on the last allowed turn: reward 0
    out_of_tokens: int = 0  # tool calls with the token budget spent: reward 0
    last_error: str = ""

    def as_metrics(self, prefix: str = "env_") -> dict[str, float]:
        return {f"{prefix}episodes": float(self.episodes),
                f"{prefix}turns_per_episode": self.turns / max(self.episodes, 1),
                f"{prefix}tool_calls": float(self.tool_calls),
                f"{prefix}malformed": float(self.malformed),
                f"{prefix}errors": float(self.env_errors),
                f"{prefix}turn_limit": float(self.turn_limit),
                f"{prefix}out_of_tokens": float(self.out_of_tokens)}


@dataclasses.dataclass(frozen=True)
class Episodes:
    """n episodes per problem, problem-major; completions are every token after the prompt."""
    samples: Samples
    masks: tuple[tuple[int, ...], ...]  # per row, 1 on the tokens the model generated
    scores: np.ndarray  # [rows]


@dataclasses.dataclass
class _Episode:
    problem: Problem
    env: Environment | None
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    truncated: bool = False
    score: float = 0.0
    answer: str | None = None  # the final turn's text, for the problem's reward

    def add(self, tokens: Sequence[int], logprobs: Sequence[float], *, generated: bool):
        self.tokens += tokens
        self.logprobs += logprobs
        self.mask += [int(generated)] * len(tokens)

    def end(self, *, score: float = 0.0, truncated: bool = False):
        self.done, self.score, self.truncated = True, score, truncated


def observation_ids(tokenizer, observation: str, *, thinking: bool, after: int) -> list[int]:
    """The template's tokens after a model turn that called tools: the `<|observation|>` turn
    holding `observation`, then the next generation prompt; less the `<|observation|>` token
    when the model ended its turn with it (`after`, its last token), as SFT renders it."""
    parts = render_chat_parts([{"role": "tool", "content": observation}],
                              add_generation_prompt=True, enable_thinking=thinking)
    text = "".join(text for source, text in parts if source != "prefix")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ids[1:] if ids[0] == after else ids


def initial_prompt(tokenizer, problem: Problem, observation: str, *, thinking: bool) -> list[int]:
    """The problem's prompt (`glm_jax.rl.evaluate.prompt_ids`), with a non-empty first
    observation as an `<|observation|>` turn before the generation prompt."""
    messages = prompt_messages(problem)
    if observation:
        messages.append({"role": "tool", "content": observation})
    text = render_chat(messages, tools=list(problem.tools) or None, add_generation_prompt=True,
                       enable_thinking=thinking)
    return tokenizer.encode(text, add_special_tokens=False).ids


def _start(tokenizer, problem, environment, *, thinking, stats) -> _Episode:
    """A fresh environment reset on the problem; one that fails ends the episode at once."""
    try:
        env = environment()
        observation = env.reset(problem)
        if not isinstance(observation, str):
            raise TypeError(f"reset returned {type(observation).__name__}, not a string")
    except Exception as e:  # noqa: BLE001: an environment never kills the rollout
        _count_error(stats, e)
        episode = _Episode(problem, None, initial_prompt(tokenizer, problem, "",
                                                         thinking=thinking))
        episode.end()
        return episode
    return _Episode(problem, env, initial_prompt(tokenizer, problem, observation,
                                                 thinking=thinking))


def _count_error(stats: EpisodeStats, error: Exception):
    stats.env_errors += 1
    stats.last_error = f"{type(error).__name__}: {error}"


def _step(env: Environment, calls: list[dict]) -> tuple[str, bool, float]:
    observation, done, reward = env.step(calls)
    if not isinstance(observation, str) or not isinstance(done, bool):
        raise TypeError(f"step returned ({type(observation).__name__}, {type(done).__name__}, "
                        "...), not (str, bool, float)")
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"step returned the reward {reward}")
    return observation, done, reward


def _take_turn(episode: _Episode, tokens: list[int], logprobs: list[float], *, tokenizer,
               stops: Sequence[int], last_turn: bool, max_new_tokens: int, thinking: bool,
               stats: EpisodeStats):
    """Appends a model turn and plays the environment's answer to it (or ends the episode)."""
    stats.turns += 1
    stopped = bool(tokens) and tokens[-1] in stops
    episode.add(tokens, logprobs, generated=True)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    parsed = parse_output(text)
    if parsed["error"] is not None:
        stats.malformed += 1
        return episode.end(truncated=not stopped)
    calls = parsed["tool_calls"]
    if not calls:
        episode.answer = text
        return episode.end(truncated=not stopped)
    stats.tool_calls += len(calls)
    if last_turn:
        stats.turn_limit += 1
        return episode.end(truncated=True)
    if not stopped:
        stats.out_of_tokens += 1
        return episode.end(truncated=True)
    try:
        observation, done, reward = _step(episode.env, calls)
        ids = observation_ids(tokenizer, observation, thinking=thinking, after=tokens[-1])
    except Exception as e:  # noqa: BLE001: an environment never kills the rollout
        _count_error(stats, e)
        return episode.end()
    if done:
        return episode.end(score=reward)
    if len(episode.tokens) + len(ids) >= max_new_tokens:  # no token left for the next turn
        stats.out_of_tokens += 1
        return episode.end(truncated=True)
    episode.add(ids, [0.0] * len(ids), generated=False)


def _turn_seed(seed: int, row: int, turn: int) -> int:
    return int(np.random.SeedSequence([seed, row, turn]).generate_state(1)[0])


def play_episodes(model, tokenizer, problems: Sequence[Problem], pool: RewardPool,
                  environment: Callable[[], Environment], *, n: int = 1,
                  sampling: SamplingConfig = SamplingConfig(temperature=0.0),
                  thinking: bool = True, max_new_tokens: int, max_turns: int, batch_size: int,
                  seed: int = 0, stats: EpisodeStats | None = None) -> Episodes:
    """n episodes of each problem, each in a fresh `environment()`, scored."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    stats = EpisodeStats() if stats is None else stats
    stops = stop_ids(tokenizer)
    episodes = [_start(tokenizer, p, environment, thinking=thinking, stats=stats)
                for p in problems for _ in range(n)]
    stats.episodes += len(episodes)
    for turn in range(max_turns):
        active = [(row, e) for row, e in enumerate(episodes) if not e.done]
        for start in range(0, len(active), batch_size):
            chunk = active[start:start + batch_size]
            contexts = [e.prompt + e.tokens for _, e in chunk]
            seeds = [_turn_seed(seed, row, turn) for row, _ in chunk]
            padding = batch_size - len(chunk)
            out = generate(model, contexts + [contexts[-1]] * padding,
                           max_new_tokens=max(max_new_tokens - len(e.tokens) for _, e in chunk),
                           sampling=sampling, stop_tokens=stops,
                           seeds=seeds + [seeds[-1]] * padding)
            for i, (_, episode) in enumerate(chunk):
                length = min(int(out.lengths[i]), max_new_tokens - len(episode.tokens))
                _take_turn(episode, out.tokens[i, :length].tolist(),
                           out.logprobs[i, :length].tolist(), tokenizer=tokenizer, stops=stops,
                           last_turn=turn == max_turns - 1, max_new_tokens=max_new_tokens,
                           thinking=thinking, stats=stats)
    _score_answers(episodes, pool)
    samples = Samples(tuple(problems), n, tuple(tuple(e.prompt) for e in episodes),
                      tuple(tokenizer.decode(e.tokens, skip_special_tokens=False)
                            for e in episodes),
                      tuple(tuple(e.tokens) for e in episodes),
                      tuple(tuple(e.logprobs) for e in episodes),
                      tuple(e.truncated for e in episodes))
    return Episodes(samples, tuple(tuple(e.mask) for e in episodes),
                    np.asarray([e.score for e in episodes], np.float32))


def _score_answers(episodes: list[_Episode], pool: RewardPool):
    """Each final answer scored by its problem's reward, one batch per reward."""
    by_reward = defaultdict(list)
    for episode in episodes:
        if episode.answer is not None:
            by_reward[episode.problem.reward].append(episode)
    for name, scored in by_reward.items():
        values = pool.score(name, [e.answer for e in scored], [e.problem.reference for e in scored])
        for episode, value in zip(scored, values):
            episode.score = value


def rollout_episodes(model, tokenizer, problems: Sequence[Problem], pool: RewardPool,
                     environment: Callable[[], Environment], *, group_size: int,
                     sampling: SamplingConfig, thinking: bool = True, max_new_tokens: int,
                     max_turns: int, batch_size: int, seed: int,
                     overlong: Overlong | None = None,
                     stats: EpisodeStats | None = None) -> Groups:
    """`group_size` episodes of each problem as GRPO groups, with their completion masks
    (overlong shaping, when given, on the whole completion's length)."""
    played = play_episodes(model, tokenizer, problems, pool, environment, n=group_size,
                           sampling=sampling, thinking=thinking, max_new_tokens=max_new_tokens,
                           max_turns=max_turns, batch_size=batch_size, seed=seed, stats=stats)
    samples, rewards = played.samples, played.scores
    if overlong is not None:
        lengths = np.asarray([len(c) for c in samples.token_ids], np.float32)
        rewards = overlong.shape(played.scores, lengths)
    return Groups(tuple(problems), group_size, samples.prompts, samples.token_ids,
                  samples.logprobs, np.asarray(samples.truncated, bool), played.scores, rewards,
                  completion_masks=played.masks)


def rollout_with_environment(model, tokenizer, problems: Sequence[Problem], pool: RewardPool,
                             *, env: str, max_turns: int, stats: EpisodeStats | None = None,
                             group_size: int, sampling: SamplingConfig, thinking: bool = True,
                             max_new_tokens: int, batch_size: int, seed: int,
                             overlong: Overlong | None = None,
                             record_routing: bool = False) -> Groups:
    """`rollout_groups`, except that the problems whose kind the environment `env` plays
    ("" = none) are played as episodes; the groups stay in the problems' order."""
    kinds = ENVIRONMENTS[env].kinds if env else ()
    played = [i for i, p in enumerate(problems) if p.kind in kinds]
    single = dict(group_size=group_size, sampling=sampling, thinking=thinking,
                  max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                  overlong=overlong)
    if not played:
        return rollout_groups(model, tokenizer, problems, pool, record_routing=record_routing,
                              **single)
    if record_routing:
        raise ValueError("routing replay does not cover multi-turn episodes")
    plain = sorted(set(range(len(problems))) - set(played))
    parts = []
    if plain:
        parts.append(rollout_groups(model, tokenizer, [problems[i] for i in plain], pool,
                                    **single))
    parts.append(rollout_episodes(model, tokenizer, [problems[i] for i in played], pool,
                                  ENVIRONMENTS[env], max_turns=max_turns, stats=stats, **single))
    order = np.argsort(plain + played, kind="stable").tolist()
    return Groups.concat(parts, group_size).select(order)
