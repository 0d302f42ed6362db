"""Tokenizers: load any Hugging Face `tokenizer.json` (GLM-4.5's included), or train a small
byte-level BPE on the local corpus once and cache it, so the offline demo needs no download.

Special tokens are GLM-4.5's, in the order of its vocabulary (ids 151329..151360 there); our
trained BPE puts them first (ids 0..N-1). `<|file_sep|>` is ours (GLM-4.5 has no repository
separator token), appended after them; with GLM's own tokenizer it encodes as plain text.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from absl import logging
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glm_jax.errors import InputError

EOT = "<|endoftext|>"
CODE_PREFIX, CODE_MIDDLE, CODE_SUFFIX = "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"
FILE_SEP = "<|file_sep|>"
MAX_PIECE_CHARS = 64

GLM_SPECIAL_TOKENS = (
    EOT, "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_transcription|>", "<|end_of_transcription|>",
    CODE_PREFIX, CODE_MIDDLE, CODE_SUFFIX,
    "/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a `tokenizer.json`; it must know `<|endoftext|>`, which ends every document."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise InputError(f"{path}: not a loadable tokenizer.json: {e}") from e
    if tokenizer.token_to_id(EOT) is None:
        raise InputError(f"{path}: tokenizer has no {EOT!r} token (needed to end documents)")
    return tokenizer


# The chat format's tokens (SPEC.md §5): each must be one token for SFT masks and parsing.
CHAT_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
               "/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
               "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>",
               "</tool_response>", EOT)


def check_chat_tokens(tokenizer: Tokenizer, where) -> None:
    """Raises naming every chat token that `tokenizer` does not encode as a single token."""
    split = [t for t in CHAT_TOKENS
             if len(tokenizer.encode(t, add_special_tokens=False).ids) != 1]
    if split:
        raise InputError(f"{where}: the tokenizer does not hold the chat tokens {split} as "
                         "single tokens (GLM-4.5's tokenizer.json and glm-jax's trained BPE do)")


def train_bpe(texts: Iterable[str], vocab_size: int, cache_path: str | os.PathLike) -> Tokenizer:
    """Trains a byte-level BPE with the GLM special tokens, or loads it if `cache_path` exists.

    The file is written atomically (temp file + rename), so an interrupted run never leaves a
    half-written tokenizer that a later run would silently load.
    """
    cache_path = Path(cache_path)
    if cache_path.exists():
        return load_tokenizer(cache_path)
    special = list(GLM_SPECIAL_TOKENS) + [FILE_SEP]
    if vocab_size < 256 + len(special):
        raise InputError(f"vocab_size {vocab_size} < 256 bytes + {len(special)} special tokens")
    tokenizer = Tokenizer(models.BPE())
    # BPE training is quadratic in the length of a pre-tokenised piece: a long run with no
    # break (minified code, base64, a 10 MB line) would take hours. Pieces are cut to
    # MAX_PIECE_CHARS; real words and indentation runs are shorter.
    # Digits stay single tokens, so numbers are spelled digit by digit (arithmetic tasks).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        pre_tokenizers.Split(Regex(f".{{1,{MAX_PIECE_CHARS}}}"), behavior="isolated")])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    logging.info("trained a %d-token byte-level BPE -> %s", tokenizer.get_vocab_size(), cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, cache_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return tokenizer


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """-> token ids [n] int32 ending with `<|endoftext|>`. Special-token strings in the text (the
    FIM sentinels, for one) become their ids; no BOS/`[gMASK]` template is added."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    ids.append(tokenizer.token_to_id(EOT))
    return np.asarray(ids, dtype=np.int32)
