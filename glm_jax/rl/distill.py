"""Expert distillation by rejection sampling (SPEC.md §4): sample several responses per prompt
from one or more teacher checkpoints (the "expert models"), keep those the prompt's reward
verifies, and of those keep the longer half per prompt (the report found the 50% longest
responses train better, and several samples per hard prompt better still). The result is an SFT
JSONL (glm_jax.data.chat's record format) with provenance on every line.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from glm_jax.data.tasks import Problem, prompt_messages
from glm_jax.infer.chat import parse_output
from glm_jax.infer.engine import SamplingConfig
from glm_jax.rl.evaluate import sample_completions, score_samples
from glm_jax.rl.rewards import RewardPool


@dataclass(frozen=True)
class Candidate:
    problem: Problem
    teacher: str
    text: str  # the completion, special tokens kept
    reward: float
    length: int  # completion tokens
    truncated: bool
    well_formed: bool  # parse_output found no error (an SFT record can hold it exactly)


def select_for_distillation(candidates: Sequence[Candidate], *, threshold: float = 1.0,
                            keep_fraction: float = 0.5) -> list[Candidate]:
    """Per prompt: the verified candidates (reward >= threshold, well formed, not truncated),
    longest first,
    of which the first ceil(keep_fraction * count) are kept (so a prompt with one verified
    response keeps it). Equal lengths keep their sampling order. Prompts keep their order."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        if candidate.reward >= threshold and candidate.well_formed and not candidate.truncated:
            by_prompt[candidate.problem.key].append(candidate)
    kept = []
    for group in by_prompt.values():
        group = sorted(group, key=lambda c: -c.length)  # stable: ties in sampling order
        kept.extend(group[:math.ceil(keep_fraction * len(group))])
    return kept


def sample_candidates(teacher: str, model, tokenizer, problems: Sequence[Problem],
                      pool: RewardPool, *, n: int, temperature: float, thinking: bool = True,
                      max_new_tokens: int = 128, batch_size: int = 64,
                      seed: int = 0) -> list[Candidate]:
    samples = sample_completions(model, tokenizer, problems, n=n,
                                 sampling=SamplingConfig(temperature=temperature),
                                 thinking=thinking, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, seed=seed)
    rewards = score_samples(samples, pool)
    return [Candidate(problem=samples.problems[i // n], teacher=teacher, text=samples.texts[i],
                      reward=float(rewards[i]), length=len(samples.token_ids[i]),
                      truncated=samples.truncated[i],
                      well_formed=parse_output(samples.texts[i])["error"] is None)
            for i in range(len(samples.texts))]


def to_record(candidate: Candidate) -> dict:
    """The candidate as an SFT conversation (the reply parsed back into reasoning, content and
    tool calls) with its provenance."""
    reply = parse_output(candidate.text)
    assistant = {"role": "assistant", "content": reply["content"],
                 "reasoning_content": reply["reasoning"]}
    if reply["tool_calls"]:
        assistant["tool_calls"] = [{"function": call} for call in reply["tool_calls"]]
    record = {"messages": prompt_messages(candidate.problem) + [assistant]}
    if candidate.problem.tools:
        record["tools"] = list(candidate.problem.tools)
    record["provenance"] = {"teacher": candidate.teacher, "problem": candidate.problem.key,
                            "reward": candidate.reward, "length": candidate.length}
    return record


def write_jsonl(records: Sequence[dict], path) -> None:
    """All lines or none: written beside `path` and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
