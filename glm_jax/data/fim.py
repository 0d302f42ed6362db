"""Fill-in-the-middle on source code (GLM-4.5 report §2: FIM on all code).

A code document is cut at two uniformly random character positions into prefix / middle /
suffix and rearranged, so the model learns to write the middle given both sides:
  PSM: <|code_prefix|>PRE<|code_suffix|>SUF<|code_middle|>MID
  SPM: <|code_suffix|>SUF<|code_prefix|>PRE<|code_middle|>MID   (CodeGeeX4's infilling order)
The sentinels are GLM-4.5's own special tokens. Cutting characters, not tokens, keeps this
independent of the tokenizer (StarCoder does the same); the document's `<|endoftext|>` then
follows the middle.
"""

from __future__ import annotations

import numpy as np

from glm_jax.data.tokenizer import CODE_MIDDLE, CODE_PREFIX, CODE_SUFFIX


def fim_permute(text: str, rng: np.random.Generator, *, spm_rate: float) -> str:
    """Cuts `text` at two random points; PSM order, or SPM with probability `spm_rate`."""
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    if rng.random() < spm_rate:
        return f"{CODE_SUFFIX}{suffix}{CODE_PREFIX}{prefix}{CODE_MIDDLE}{middle}"
    return f"{CODE_PREFIX}{prefix}{CODE_SUFFIX}{suffix}{CODE_MIDDLE}{middle}"


def apply_fim(doc: dict, rng: np.random.Generator, *, rate: float, spm_rate: float) -> dict:
    """FIM-permutes a code document with probability `rate`; other documents pass unchanged."""
    if not doc["is_code"] or rng.random() >= rate:
        return doc
    return {**doc, "text": fim_permute(doc["text"], rng, spm_rate=spm_rate)}
