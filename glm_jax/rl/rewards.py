"""Verifiable rewards: plain functions `(completion: str, reference) -> float` that never raise.

`completion` is the model's text after the generation prompt, special tokens kept (a reply may
hold `<think>...</think>`, tool calls and a stop token). Rewards read the final answer: the text
after the last `</think>`, up to the first stop token. `REWARDS` names them, so a task, a JSONL
of prompts or a config can say which one applies, and `RewardPool` scores batches in worker
processes (math-verify's timeouts use `signal.alarm`, which works only in a main thread, and a
reward that hangs or crashes must not take the run with it).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from glm_jax.infer.chat import parse_output
from glm_jax.rl.sandbox import Limits, run_tests

_STOPS = ("<|user|>", "<|observation|>", "<|endoftext|>")
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def final_text(completion: str) -> str:
    """The answer part of a reply: after the last `</think>`, before the first stop token."""
    for stop in _STOPS:
        completion = completion.split(stop, 1)[0]
    return completion.rsplit("</think>", 1)[-1].strip()


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, pos = 1, start + len(_BOXED)
    for i in range(pos, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[pos:i]
    return None


def extract_answer(completion: str) -> str | None:
    """The last `\\boxed{...}` of the final text, else its last number."""
    text = final_text(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def math_reward(completion: str, reference: str, *, timeout_seconds: int = 5) -> float:
    """1.0 iff math-verify finds the extracted answer equal to `reference` (a plain number or
    LaTeX in `$...$`), gold first: `verify(parse(gold), parse(answer))`. Uses signal.alarm
    timeouts: call it in a main thread (or through RewardPool)."""
    from math_verify import parse, verify

    try:
        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        gold = parse(str(reference), parsing_timeout=timeout_seconds)
        target = parse(f"${answer}$", parsing_timeout=timeout_seconds)
        return float(bool(verify(gold, target, timeout_seconds=timeout_seconds)))
    except Exception:  # math-verify on adversarial text: a wrong answer, never a crash
        return 0.0


def exact_match_reward(completion: str, reference: str, *, normalize_whitespace: bool = True,
                       ignore_case: bool = False) -> float:
    """1.0 iff the final text equals `reference` (whitespace runs collapsed, case folded: each
    configurable)."""
    def norm(text: str) -> str:
        text = " ".join(text.split()) if normalize_whitespace else text.strip()
        return text.casefold() if ignore_case else text

    try:
        return float(norm(final_text(completion)) == norm(str(reference)))
    except Exception:
        return 0.0


def function_call_reward(completion: str, reference: Sequence[dict]) -> float:
    """1.0 iff the reply parses without error AND its tool calls equal `reference` exactly
    (names, argument keys and values, order; as `parse_output` returns them), else 0.0
    (SPEC.md §4: format and exact match, no partial credit)."""
    try:
        parsed = parse_output(completion)
        if parsed["error"] is not None:
            return 0.0
        return float(_strict_json(parsed["tool_calls"]) == _strict_json(list(reference)))
    except Exception:
        return 0.0


def _strict_json(value) -> str:
    """Canonical text in which True and 1, or 1 and 1.0, differ; the order of calls and of list
    items counts, the order of an object's keys does not."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def code_reward(completion: str, reference, *, all_or_nothing: bool = False,
                limits: Limits = Limits()) -> float:
    """Runs the reply's code (its last ```python block, else the whole final text) against
    `reference` tests (a list of assert snippets, or `{"tests": [...]}`) in a sandboxed
    subprocess (glm_jax.rl.sandbox): the fraction passed, or 1.0 only if all pass."""
    try:
        tests = reference["tests"] if isinstance(reference, dict) else list(reference)
        if not tests:
            return 0.0
        text = final_text(completion)
        blocks = _CODE_BLOCK.findall(text)
        passed = run_tests(blocks[-1] if blocks else text, tests, limits)
        if all_or_nothing:
            return float(all(passed))
        return sum(passed) / len(passed)
    except Exception:
        return 0.0


REWARDS: dict[str, Callable[[str, Any], float]] = {
    "math": math_reward,
    "exact_match": exact_match_reward,
    "function_call": function_call_reward,
    "code": code_reward,
    "code_all_or_nothing": functools.partial(code_reward, all_or_nothing=True),
}


def get_reward(name: str) -> Callable[[str, Any], float]:
    if name not in REWARDS:
        from glm_jax.errors import InputError

        raise InputError(f"unknown reward {name!r}; the rewards are {sorted(REWARDS)}")
    return REWARDS[name]


# ---- batch scoring ------------------------------------------------------------------------

@dataclass
class ScoreStats:
    scored: int = 0
    errors: int = 0  # the reward raised (counted 0.0)
    timeouts: int = 0  # the reward ran past its time (counted 0.0)
    seconds: float = 0.0
    last_error: str = ""

    def as_metrics(self, prefix: str = "reward_") -> dict[str, float]:
        return {f"{prefix}errors": float(self.errors), f"{prefix}timeouts": float(self.timeouts),
                f"{prefix}scored_per_s": self.scored / max(self.seconds, 1e-9)}


def _warm_up():
    """Worker initializer: imports and first calls are slow (math-verify builds its parsers on
    first use); done before the worker takes an item, so no item's timeout pays for them."""
    math_reward("\\boxed{1}", "1")


def _ping() -> bool:
    return True


class RewardTimeout(BaseException):
    """Raised by the alarm in a reward that ran too long; a BaseException, so a reward's own
    `except Exception` cannot swallow it."""


def _score_one(item):
    """Worker side: (name, completion, reference, seconds) -> ("ok" | "error" | "timeout", value)."""
    import signal

    name, completion, reference, seconds = item

    def expire(*_):
        raise RewardTimeout(f"reward {name!r} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        value = float(get_reward(name)(completion, reference))
        return ("ok", value) if value == value else ("error", "NaN reward")
    except RewardTimeout as e:
        return "timeout", str(e)
    except Exception as e:  # noqa: BLE001: every failure of a reward counts 0.0
        return "error", f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class RewardPool:
    """Scores (completion, reference) pairs with a named reward in `workers` spawned processes,
    at most `queue_size` in flight. A reward that raises, returns NaN or outlives
    `timeout_seconds` scores 0.0 and is counted in `stats`; a worker that stops answering is
    replaced (the pool restarts). `workers=0` scores in this process (tests, debugging)."""

    workers: int = 2
    timeout_seconds: int = 10
    queue_size: int = 64
    startup_seconds: int = 300  # a worker's first import of jax and sympy on a busy machine
    stats: ScoreStats = field(default_factory=ScoreStats)

    def __post_init__(self):
        self._pool = None

    def _start(self):
        if self._pool is None and self.workers:
            pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_warm_up)
            try:  # at least one worker is ready before any item's timeout starts
                pool.apply_async(_ping).get(self.startup_seconds)
            except multiprocessing.TimeoutError:
                pool.terminate()
                raise RuntimeError(f"reward workers did not start in {self.startup_seconds} s")
            self._pool = pool
        return self._pool

    def score(self, reward: str, completions: Sequence[str], references: Sequence) -> list[float]:
        get_reward(reward)  # an unknown name fails here, in the caller
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        start = time.perf_counter()
        items = [(reward, c, r, self.timeout_seconds) for c, r in zip(completions, references)]
        if self.workers:
            results = self._score_pooled(items)
        else:
            results = [_score_one(item) for item in items]
        scores = []
        for status, value in results:
            if status == "ok":
                scores.append(value)
                continue
            scores.append(0.0)
            self.stats.last_error = value
            if status == "timeout":
                self.stats.timeouts += 1
            else:
                self.stats.errors += 1
        self.stats.scored += len(items)
        self.stats.seconds += time.perf_counter() - start
        return scores

    def _score_pooled(self, items):
        results, pending, next_item = [None] * len(items), {}, 0
        while next_item < len(items) or pending:
            pool = self._start()
            while next_item < len(items) and len(pending) < self.queue_size:
                pending[next_item] = pool.apply_async(_score_one, (items[next_item],))
                next_item += 1
            index = min(pending)
            try:  # the worker's own alarm should fire first; this catches a wedged worker
                results[index] = pending.pop(index).get(self.timeout_seconds + 5)
            except multiprocessing.TimeoutError:
                results[index] = ("timeout", f"reward worker stopped answering "
                                             f"(> {self.timeout_seconds + 5} s)")
                next_item = index + 1  # the rest in flight (index+1 ...) go to a fresh pool
                pending.clear()
                self.close()
            except Exception as e:  # e.g. an unpicklable reference
                results[index] = ("error", f"{type(e).__name__}: {e}")
        return results

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
