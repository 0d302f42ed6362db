"""A built-in family of verifiable tasks, small enough for a tiny model on a CPU: multi-digit
addition, sorting a short list, calling a calculator tool for a product, and answering with
the product the calculator returned (a multi-turn episode: call, tool response, answer).

Every problem is generated deterministically from (kind, operands) and has a reasoning trace
(the think block), a final answer, the name of the reward that checks it and the reward's
reference. A problem's split is a hash of its canonical key, so the train and held-out splits
never share a problem, whatever the seeds. `conversation(problem, thinking=...)` renders it as
an OpenAI-style chat for SFT; non-thinking conversations carry an empty reasoning (the template
then renders `<think></think>`, and `/nothink` goes on the user turn).

The first kinds share one random stream; every kind added after them draws from its own, so
adding a kind leaves the problems of the others as they were (same keys, same order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Iterator

from glm_jax.errors import InputError

KINDS = ("add", "sort", "calculator", "calculator_answer")
_SHARED_STREAM_KINDS = ("add", "sort", "calculator")  # one stream, as before kinds were added
HELDOUT_PERCENT = 10
CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluates an arithmetic expression.",
    "parameters": {"type": "object", "required": ["expression"],
                   "properties": {"expression": {"type": "string"}}}}}


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str  # canonical, e.g. "add:37+45"; decides the split
    kind: str
    prompt: str  # the user message
    reasoning: str  # the think block of a worked answer
    answer: str  # the assistant content of a worked answer
    reward: str  # a name in glm_jax.rl.rewards.REWARDS
    reference: Any  # what that reward compares against
    tools: tuple = ()  # tool definitions offered in the system part
    tool_calls: tuple = ()  # the worked answer's tool calls
    # Multi-turn worked answers: the responses to `tool_calls`, after which a second assistant
    # turn (`answer_reasoning`, then `answer`) answers; the first turn only calls.
    tool_results: tuple = ()
    answer_reasoning: str = ""

    @property
    def split(self) -> str:
        digest = int(hashlib.sha256(self.key.encode()).hexdigest()[:8], 16)
        return "heldout" if digest % 100 < HELDOUT_PERCENT else "train"


def _add(rng: random.Random, digits: int) -> Problem:
    a, b = (rng.randrange(10 ** (digits - 1), 10 ** digits) for _ in range(2))
    steps, carry = [], 0
    for da, db in zip(reversed(str(a).zfill(digits)), reversed(str(b).zfill(digits))):
        total = int(da) + int(db) + carry
        steps.append(f"{da} + {db}" + (f" + {carry}" if carry else "") + f" = {total}")
        carry = total // 10
    reasoning = ", ".join(steps) + f". So {a} + {b} = {a + b}."
    return Problem(key=f"add:{a}+{b}", kind="add", prompt=f"What is {a} + {b}?",
                   reasoning=reasoning, answer=f"\\boxed{{{a + b}}}", reward="math",
                   reference=str(a + b))


def _sort(rng: random.Random, length: int) -> Problem:
    values = [rng.randrange(100) for _ in range(length)]
    reasoning, text = _sorted_work(values, descending=False)
    return Problem(key="sort:" + ",".join(map(str, values)), kind="sort",
                   prompt="Sort in ascending order: " + ", ".join(map(str, values)),
                   reasoning=reasoning, answer=text, reward="exact_match", reference=text)


def _sorted_work(values, *, descending: bool) -> tuple[str, str]:
    """(reasoning, answer) of a list worked in the given order."""
    ordered = sorted(values, reverse=descending)
    start = "From the largest: " if descending else "From the smallest: "
    return start + ", then ".join(map(str, ordered)) + ".", ", ".join(map(str, ordered))


def flawed(problem: Problem) -> Problem:
    """The problem worked by a careless teacher, for SFT data with a systematic mistake that a
    verifiable reward can remove: sorting comes out in descending order (the direction misread).
    Other kinds have no modelled mistake and come back unchanged; the reference stays right."""
    if problem.kind != "sort":
        return problem
    reasoning, answer = _sorted_work(map(int, problem.reference.split(", ")), descending=True)
    return dataclasses.replace(problem, reasoning=reasoning, answer=answer)


def _calculator(rng: random.Random) -> Problem:
    a, b = rng.randrange(10, 1000), rng.randrange(10, 100)
    expression = f"{a} * {b}"
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return Problem(key=f"calc:{a}*{b}", kind="calculator",
                   prompt=f"Use the calculator to compute {a} times {b}.",
                   reasoning=f"I call the calculator with {expression}.", answer="",
                   reward="function_call", reference=[call], tools=(CALCULATOR_TOOL,),
                   tool_calls=(call,))


def _calculator_answer(rng: random.Random) -> Problem:
    a, b = rng.randrange(10, 1000), rng.randrange(10, 100)
    expression, product = f"{a} * {b}", a * b
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return Problem(key=f"calc_answer:{a}*{b}", kind="calculator_answer",
                   prompt=f"What is {a} times {b}? Use the calculator.",
                   reasoning=f"I call the calculator with {expression}.",
                   answer=f"\\boxed{{{product}}}", reward="math", reference=str(product),
                   tools=(CALCULATOR_TOOL,), tool_calls=(call,), tool_results=(str(product),),
                   answer_reasoning=f"The calculator returned {product}.")


def _draw(kind: str, rng: random.Random) -> Problem:
    if kind == "add":
        return _add(rng, rng.choice((2, 3)))
    if kind == "sort":
        return _sort(rng, rng.choice((3, 4, 5)))
    if kind == "calculator":
        return _calculator(rng)
    if kind == "calculator_answer":
        return _calculator_answer(rng)
    raise ValueError(f"unknown task kind {kind!r}; the kinds are {KINDS}")


def parse_kinds(text: str, what: str) -> tuple[str, ...]:
    """A comma-separated list of task kinds; `what` (a config field or a flag) names it in the
    error for an empty list or an unknown kind."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds or set(kinds) - set(KINDS):
        raise InputError(f"{what}: kinds must be among {KINDS}, got {text!r}")
    return kinds


def problems(split: str, count: int, *, kinds=KINDS, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "heldout"), kinds in turn."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    shared = random.Random(f"{seed}:{split}")
    own = {kind: random.Random(f"{seed}:{split}:{kind}") for kind in kinds
           if kind not in _SHARED_STREAM_KINDS}
    out, seen = [], set()
    for kind in _cycle(kinds):
        if len(out) == count:
            return out
        rng = own.get(kind, shared)
        for _ in range(10_000):
            problem = _draw(kind, rng)
            if problem.split == split and problem.key not in seen:
                seen.add(problem.key)
                out.append(problem)
                break
        else:
            raise ValueError(f"could not draw more {kind!r} problems for {split!r}")
    return out


def _cycle(kinds) -> Iterator[str]:
    while True:
        yield from kinds


def prompt_messages(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": problem.prompt}]


def conversation(problem: Problem, *, thinking: bool = True) -> dict:
    """The worked problem as {"messages", "tools"} (the SFT JSONL record format); with
    `tool_results`, the call turn, the tool responses and the answer turn."""
    multi_turn = bool(problem.tool_results)
    assistant = {"role": "assistant", "content": "" if multi_turn else problem.answer,
                 "reasoning_content": problem.reasoning if thinking else ""}
    if problem.tool_calls:
        assistant["tool_calls"] = [{"function": dict(call)} for call in problem.tool_calls]
    messages = prompt_messages(problem) + [assistant]
    if multi_turn:
        messages += [{"role": "tool", "content": result} for result in problem.tool_results]
        messages.append({"role": "assistant", "content": problem.answer,
                         "reasoning_content": problem.answer_reasoning if thinking else ""})
    record = {"messages": messages, "thinking": thinking}
    if problem.tools:
        record["tools"] = list(problem.tools)
    return record


def load_problems(path) -> list[Problem]:
    """Prompts with references from a JSONL file: one object per line with `prompt` (the user
    message), `reference`, `reward` (a name in glm_jax.rl.rewards.REWARDS), and optionally
    `tools` and `kind`. Errors name file and line."""
    import json

    from glm_jax.data.sources import BadRecordError
    from glm_jax.rl.rewards import REWARDS

    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecordError(f"{where}: not JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise BadRecordError(f"{where}: needs a string 'prompt'")
            if record.get("reward") not in REWARDS:
                raise BadRecordError(f"{where}: 'reward' must be one of {sorted(REWARDS)}, got "
                                     f"{record.get('reward')!r}")
            if "reference" not in record:
                raise BadRecordError(f"{where}: needs a 'reference'")
            tools = record.get("tools") or []
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise BadRecordError(f"{where}: 'tools' must be a list of objects")
            out.append(Problem(key=where, kind=str(record.get("kind", "jsonl")),
                               prompt=record["prompt"], reasoning="", answer="",
                               reward=record["reward"], reference=record["reference"],
                               tools=tuple(tools)))
    if not out:
        raise BadRecordError(f"{path}: no prompts")
    return out
