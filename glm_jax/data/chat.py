"""Chat conversations for SFT: JSONL records -> validated conversations -> tokens with an
assistant-only loss mask.

A record is one JSON object per line: `messages` (OpenAI style, as `render_chat` takes them:
system / user / assistant / tool roles, assistant `reasoning_content` and `tool_calls`) and
optionally `tools`. Every defect is reported with file and line.

The loss covers what the model writes: for each assistant turn, everything after its
`<|assistant|>` token (the think block, the content, the tool calls) plus the token that ends
the turn (`<|user|>` or `<|observation|>`, GLM-4.5's stop tokens; `<|endoftext|>`, appended, when
the conversation ends on the assistant). System, user and tool-response text, role tokens that
open those turns and the tool list are context only. Rendering goes through the official
template's rules (`render_chat_parts`), so earlier turns' reasoning is dropped exactly as at
inference. A non-thinking conversation (the configured fraction) is rendered the way the
template renders non-thinking mode: `/nothink` on user turns and an empty think block.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from glm_jax.data.sources import BadRecordError
from glm_jax.data.tokenizer import EOT
from glm_jax.infer.chat import render_chat_parts

ROLES = ("system", "user", "assistant", "tool")
_ASSISTANT_TOKEN = "<|assistant|>"
_TURN_ENDS = ("<|user|>", "<|observation|>")  # stop tokens the model emits to end its turn


def validate_conversation(record: Any) -> dict:
    """-> the record as {"messages", "tools"} with tool-call arguments given as JSON strings
    decoded; raises ValueError saying what is wrong (the caller adds file and line)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {ROLES}, got {role!r}")
        content = message.get("content")
        if not (isinstance(content, str) or (isinstance(content, list)) or
                (content is None and role == "assistant" and message.get("tool_calls"))):
            raise ValueError(f"{where}.content must be a string or a list of parts")
        message = dict(message)
        if role == "assistant":
            reasoning = message.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(f"{where}.reasoning_content must be a string")
            if message.get("tool_calls") is not None:
                message["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]")
                                         for j, call in enumerate(_as_list(
                                             message["tool_calls"], f"{where}.tool_calls"))]
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to learn from")
    tools = record.get("tools")
    if tools is not None:
        tools = _as_list(tools, "tools")
        if not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("'tools' must be a list of objects")
    return {"messages": out, "tools": tools}


def _as_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list")
    return value


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where} must be an object")
    function = call.get("function") or call
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty string")
    if isinstance(arguments, str):  # OpenAI's wire format: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: 'arguments' is a string that is not JSON ({e})") from e
    if not isinstance(arguments, Mapping):
        raise ValueError(f"{where}: 'arguments' must be an object")
    return {"function": {"name": name, "arguments": dict(arguments)}}


def load_conversations(path, *, on_bad_record: str = "raise") -> list[dict]:
    """Validated conversations of a JSONL file; a bad line raises BadRecordError naming
    file:line, or with on_bad_record="skip" is left out."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                conversation = validate_conversation(json.loads(line))
                render_chat_parts(conversation["messages"], tools=conversation["tools"])
            except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
                if on_bad_record == "skip":
                    continue
                raise BadRecordError(f"{path}:{number}: {e}") from None
            conversations.append(conversation)
    if not conversations:
        raise BadRecordError(f"{path}: no conversations")
    return conversations


def without_reasoning(messages: Sequence[Mapping]) -> list[dict]:
    """Assistant turns with an empty reasoning: rendered as `<think></think>`."""
    return [{**m, "reasoning_content": ""} if m.get("role") == "assistant" else dict(m)
            for m in messages]


def render_text(conversation: Mapping, *, thinking: bool = True) -> str:
    """The conversation's training text (what `tokenize_conversation` tokenises, less the
    final `<|endoftext|>`)."""
    messages = conversation["messages"] if thinking else without_reasoning(conversation["messages"])
    return "".join(text for _, text in render_chat_parts(
        messages, tools=conversation.get("tools"), enable_thinking=thinking))


def tokenize_conversation(tokenizer: Tokenizer, conversation: Mapping, *,
                          thinking: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids [n] int32, assistant mask [n] bool): the mask marks the tokens the model
    writes (see the module docstring). Pieces are tokenised one by one; every boundary
    touches a special token, so this equals tokenising the whole rendered text."""
    messages = conversation["messages"]
    if not thinking:
        messages = without_reasoning(messages)
    parts = render_chat_parts(messages, tools=conversation.get("tools"),
                              enable_thinking=thinking)
    ids: list[int] = []
    mask: list[bool] = []

    def add(text: str, trained: bool):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids.extend(piece)
        mask.extend([trained] * len(piece))

    previous = None
    for source, text in parts:
        if source == "assistant":
            add(_ASSISTANT_TOKEN, False)
            add(text[len(_ASSISTANT_TOKEN):], True)
        elif previous == "assistant" and text.startswith(_TURN_ENDS):
            end = next(t for t in _TURN_ENDS if text.startswith(t))
            add(end, True)
            add(text[len(end):], False)
        else:
            add(text, False)
        previous = source
    if previous == "assistant":
        add(EOT, True)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def sft_features(ids: np.ndarray, assistant: np.ndarray) -> dict[str, np.ndarray]:
    """-> unpacked {input_ids, target_ids, loss_mask} [n]: the loss at position t predicts
    token t+1, so it is on where token t+1 is the assistant's."""
    loss_mask = np.zeros(len(ids), np.float32)
    loss_mask[:-1] = assistant[1:]
    return {"input_ids": ids.astype(np.int32), "target_ids": np.append(ids[1:], 0).astype(np.int32),
            "loss_mask": loss_mask}
