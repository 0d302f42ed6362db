"""The evaluation harness: held-out bits per byte on text, and task scores from sampled
completions (pass@k with the unbiased estimator, mean reward, function-call accuracy), each in
thinking or non-thinking mode. The RL loop's held-out reward is this same code.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.data.tasks import Problem, prompt_messages
from glm_jax.infer.chat import render_chat
from glm_jax.infer.engine import SamplingConfig, generate
from glm_jax.rl.environments import ENVIRONMENTS, environment_for
from glm_jax.rl.rewards import RewardPool

STOP_TOKEN_NAMES = ("<|endoftext|>", "<|user|>", "<|observation|>")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, SPEC.md §4b):
    1 - C(n - c, k) / C(n, k), and 1 when n - c < k. Computed as a running product, so large n
    neither overflows nor loses precision."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def stop_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.token_to_id(t) for t in STOP_TOKEN_NAMES) if i is not None]


def prompt_ids(tokenizer, problem: Problem, *, thinking: bool) -> list[int]:
    text = render_chat(prompt_messages(problem), tools=list(problem.tools) or None,
                       add_generation_prompt=True, enable_thinking=thinking)
    return tokenizer.encode(text, add_special_tokens=False).ids


@dataclass(frozen=True)
class Samples:
    """n completions per problem, in problem-major order (row p * n + j)."""
    problems: tuple[Problem, ...]
    n: int
    prompts: tuple[tuple[int, ...], ...]  # each row's prompt token ids
    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    logprobs: tuple[tuple[float, ...], ...]
    truncated: tuple[bool, ...]
    # with record_routing: per row [prompt + completion tokens, MoE layers, k] expert ids
    routing: tuple[np.ndarray, ...] | None = None


def sample_completions(model, tokenizer, problems: Sequence[Problem], *, n: int = 1,
                       sampling: SamplingConfig = SamplingConfig(temperature=0.0),
                       thinking: bool = True, max_new_tokens: int = 96, batch_size: int = 64,
                       seed: int = 0, record_routing: bool = False) -> Samples:
    """n completions of each problem's prompt, in batches of `batch_size` rows (the last batch
    padded with repeats, so every batch compiles to the same shapes); `record_routing` keeps
    each row's selected experts (for routing replay)."""
    prompts = [prompt_ids(tokenizer, p, thinking=thinking) for p in problems for _ in range(n)]
    stops = stop_ids(tokenizer)
    texts, ids, logps, truncated, routing = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        seeds = [seed * 1_000_003 + start + i for i in range(batch_size)]
        out = generate(model, chunk, max_new_tokens=max_new_tokens, sampling=sampling,
                       stop_tokens=stops, seeds=seeds, record_routing=record_routing)
        if record_routing:
            routing.extend(out.routing[:real])
        for row in range(real):
            length = int(out.lengths[row])
            tokens = out.tokens[row, :length].tolist()
            ids.append(tuple(tokens))
            logps.append(tuple(out.logprobs[row, :length].tolist()))
            truncated.append(length == max_new_tokens and tokens[-1] not in stops)
            texts.append(tokenizer.decode(tokens, skip_special_tokens=False))
    return Samples(tuple(problems), n, tuple(map(tuple, prompts)), tuple(texts), tuple(ids),
                   tuple(logps), tuple(truncated), tuple(routing) if record_routing else None)


def score_samples(samples: Samples, pool: RewardPool) -> np.ndarray:
    """Rewards [len(problems) * n], each problem's completions scored by its own reward."""
    rewards = np.zeros(len(samples.texts), np.float32)
    by_reward = defaultdict(list)
    for index, text in enumerate(samples.texts):
        by_reward[samples.problems[index // samples.n].reward].append(index)
    for name, indices in by_reward.items():
        references = [samples.problems[i // samples.n].reference for i in indices]
        scores = pool.score(name, [samples.texts[i] for i in indices], references)
        rewards[indices] = scores
    return rewards


def task_metrics(samples: Samples, rewards: np.ndarray, *, ks: Sequence[int] = (1,),
                 prefix: str = "eval_") -> dict[str, float]:
    """mean reward ("accuracy"), pass@k for each k <= n (correct = reward 1), per kind, and the
    function-call accuracy (the calculator kind's mean reward)."""
    n = samples.n
    correct = (rewards >= 1.0).reshape(-1, n).sum(axis=1)
    out = {f"{prefix}accuracy": float(rewards.mean()),
           f"{prefix}truncated_frac": float(np.mean(samples.truncated)),
           f"{prefix}response_len": float(np.mean([len(t) for t in samples.token_ids]))}
    for k in ks:
        if k <= n:
            out[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    kinds = np.asarray([p.kind for p in samples.problems])
    per_problem = rewards.reshape(-1, n).mean(axis=1)
    for kind in sorted(set(kinds)):
        out[f"{prefix}accuracy_{kind}"] = float(per_problem[kinds == kind].mean())
    if "calculator" in set(kinds):
        out[f"{prefix}function_call_accuracy"] = out[f"{prefix}accuracy_calculator"]
    return out


def evaluate_tasks(model, tokenizer, problems: Sequence[Problem], pool: RewardPool, *,
                   n: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0,
                   thinking: bool = True, max_new_tokens: int = 96, batch_size: int = 64,
                   seed: int = 0, max_turns: int = 3, prefix: str = "eval_") -> dict[str, float]:
    """`task_metrics` of n completions per problem. Problems of a kind a tool environment plays
    (glm_jax.rl.environments) are played as episodes of at most `max_turns` model turns, so
    their score is the answer's after the tool responses; their completions are whole
    episodes."""
    from glm_jax.rl.agentic import play_episodes

    sampling = SamplingConfig(temperature=temperature)
    by_env = defaultdict(list)
    for problem in problems:
        by_env[environment_for(problem.kind)].append(problem)
    samples = sample_completions(model, tokenizer, by_env.pop("", []), n=n, sampling=sampling,
                                 thinking=thinking, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, seed=seed)
    rewards = score_samples(samples, pool)
    for name, played in sorted(by_env.items()):
        episodes = play_episodes(model, tokenizer, played, pool, ENVIRONMENTS[name], n=n,
                                 sampling=sampling, thinking=thinking,
                                 max_new_tokens=max_new_tokens, max_turns=max_turns,
                                 batch_size=batch_size, seed=seed)
        samples = _joined(samples, episodes.samples)
        rewards = np.concatenate([rewards, episodes.scores])
    return task_metrics(samples, rewards, ks=ks, prefix=prefix)


def _joined(a: Samples, b: Samples) -> Samples:
    """b's rows after a's (the metrics do not depend on the problems' order)."""
    return Samples(a.problems + b.problems, a.n, a.prompts + b.prompts, a.texts + b.texts,
                   a.token_ids + b.token_ids, a.logprobs + b.logprobs, a.truncated + b.truncated)


@nnx.jit
def _token_nll(model, ids, mask):
    logits = model(ids[:, :-1]).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:])


def bits_per_byte(model, tokenizer, texts: Sequence[str], *, seq_len: int = 256) -> float:
    """Held-out bits per UTF-8 byte: the summed next-token negative log-likelihood (in bits)
    over each text's tokens, divided by the text's bytes; texts are cut into windows of
    `seq_len` tokens (each window's first token has no context and is not scored)."""
    total_nll, total_bytes = 0.0, 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) < 2:
            continue
        windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
        width = seq_len + 1
        batch = np.zeros((len(windows), width), np.int32)
        mask = np.zeros((len(windows), width), np.float32)
        for row, window in enumerate(windows):
            batch[row, :len(window)] = window
            mask[row, :len(window)] = 1.0
        total_nll += float(_token_nll(model, jnp.asarray(batch), jnp.asarray(mask)))
        total_bytes += len(text.encode("utf-8"))
    if not total_bytes:
        raise ValueError("bits_per_byte needs at least one text of two or more tokens")
    return total_nll / math.log(2) / total_bytes


def heldout_texts(problems: Sequence[Problem], *, thinking: bool) -> list[str]:
    """The worked conversations of problems that have one (the built-in tasks), rendered in
    the mode: the text whose bits per byte measure how well the model knows the format."""
    from glm_jax.data.chat import render_text
    from glm_jax.data.tasks import conversation

    return [render_text(conversation(p, thinking=thinking), thinking=thinking)
            for p in problems if p.answer or p.tool_calls]


def evaluate_model(model, tokenizer, problems: Sequence[Problem], pool: RewardPool, *,
                   modes: Sequence[str] = ("think", "nothink"), texts: Sequence[str] = (),
                   **kwargs) -> list[dict]:
    """One row per mode ("think", "nothink"): task metrics (`evaluate_tasks`, unprefixed) and
    the bits per byte of the worked held-out conversations in that mode; plus a "text" row with
    the bits per byte of `texts` when given."""
    rows = []
    for mode in modes:
        if mode not in ("think", "nothink"):
            raise ValueError(f"mode must be 'think' or 'nothink', got {mode!r}")
        thinking = mode == "think"
        row = {"mode": mode}
        if problems:
            row.update(evaluate_tasks(model, tokenizer, problems, pool, thinking=thinking,
                                      prefix="", **kwargs))
            worked = heldout_texts(problems, thinking=thinking)
            if worked:
                row["bits_per_byte"] = bits_per_byte(model, tokenizer, worked)
        rows.append(row)
    if texts:
        rows.append({"mode": "text", "bits_per_byte": bits_per_byte(model, tokenizer, texts)})
    return rows
