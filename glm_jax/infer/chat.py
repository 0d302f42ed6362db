"""GLM-4.5 chat format: render conversations to prompt text, parse the model's replies.

`render_chat` reproduces, byte for byte, what transformers' `apply_chat_template` makes of GLM-4.5's
official Jinja template (`glm45_chat_template.jinja`, rendered with `trim_blocks`, `lstrip_blocks`
and a `tojson` that keeps non-ASCII). It is written by hand in plain Python, rather than by running
the template through jinja2, so that the library needs neither jinja2 nor transformers at runtime
and so that every rule of the format is spelled out where it is applied. The tests render the
official template with jinja2 and compare bytes; where the template has odd corners (a `None`
content rendered as the text "None", list-valued tool results always opening a new
`<|observation|>`), this module mirrors them on purpose and says so.

`parse_output` is the inverse for the model's side of the conversation: the text generated after
the `<|assistant|>` generation prompt, split into reasoning, content and XML tool calls. No library
parses GLM's tool-call XML, and model output is untrusted, so the parser is a small hand-written
scanner that reports the first malformation (with its character offset) instead of raising.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["parse_output", "render_chat", "render_chat_parts", "render_tool_calls"]

# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

_PREFIX = "[gMASK]<sop>"

# The template's tools system block, around one JSON line per tool. It ends at `</tool_call>` with
# no newline: the next role token follows directly.
_TOOLS_HEADER = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the "
    "following XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
    "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
    "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)

_NOTHINK = "/nothink"
_EMPTY_THINK = "\n<think></think>"

# transformers copies a message's reasoning from the first of these that is not None into
# `reasoning_content`, the only name the template reads.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# A message without `content` behaves like an empty list: the template sees jinja's Undefined,
# which iterates as empty (so it renders "" as text, and no tool responses).
_NO_CONTENT = ()


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """Renders OpenAI-style `messages` exactly as GLM-4.5's chat template does.

    Messages take the forms `apply_chat_template` accepts: `role` one of system/user/assistant/tool
    (the template silently drops any other role, and so does this); `content` a string or a list of
    text parts (`{"type": "text", "text": ...}` or plain strings); assistant `reasoning_content`
    (or its aliases `thinking`/`reasoning`) and `tool_calls` (`{"function": {"name", "arguments"}}`
    or flat `{"name", "arguments"}`, arguments a dict); tool content a string or a list of results
    (`{"output": ...}` or plain values). `tools` are JSON schemas (dicts).

    `enable_thinking=False` asks for non-thinking mode: `/nothink` on every user message and an
    empty `<think></think>` closing the generation prompt.

    Inputs the template cannot render either (a message, tool or tool call that is not a dict,
    `tools` that is not a list, a non-string function name, arguments that are not a dict, tool
    content that is not a string or list) raise TypeError naming the culprit.
    """
    return "".join(text for _, text in render_chat_parts(
        messages, tools=tools, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking))


def render_chat_parts(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> list[tuple[str, str]]:
    """`render_chat`'s output as (source, text) pieces that concatenate to it: source is
    "prefix", "tools", "generation_prompt" or the role of the message the text renders. Every
    boundary between pieces touches a special token (a role token, or `</tool_response>` before
    a tool result that continues an observation), so SFT can mask by piece (loss on what the
    assistant writes) and tokenise piece by piece exactly as the whole."""
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise TypeError(f"tools must be a list of tool definitions (dicts), got "
                            f"{type(tools).__name__}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TypeError(f"tools[{i}] must be a dict, got {type(tool).__name__}")
    # Reasoning survives only in assistant turns after the last user message.
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    parts = [("prefix", _PREFIX)]
    if tools:
        parts.append(("tools", _render_tools(tools)))
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            text = "<|system|>\n" + _visible_text(message.get("content", _NO_CONTENT))
        elif role == "user":
            text = _render_user(message, enable_thinking)
        elif role == "assistant":
            text = _render_assistant(message, keep_reasoning=i > last_user)
        elif role == "tool":
            continues = i > 0 and messages[i - 1].get("role") == "tool"
            text = _render_tool(message, i, opens_observation=not continues)
        else:
            continue
        parts.append((role, text))
    if add_generation_prompt:
        parts.append(("generation_prompt",
                      "<|assistant|>" + ("" if enable_thinking else _EMPTY_THINK)))
    return parts


def render_tool_calls(tool_calls: Iterable[Mapping[str, Any]]) -> str:
    """Renders tool calls as the XML an assistant turn carries after its content.

    Each call is `\\n<tool_call>NAME\\n` then `<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n`
    per argument, then `</tool_call>`. String values are written verbatim (no quoting or escaping),
    any other value as JSON, so the string "123" and the number 123 render alike.
    """
    return "".join(_render_tool_call(call) for call in tool_calls)


def _render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools system block: each schema as one line of JSON, non-ASCII kept."""
    return _TOOLS_HEADER + "".join(_tojson(tool) + "\n" for tool in tools) + _TOOLS_FOOTER


def _render_user(message: Mapping[str, Any], enable_thinking: bool) -> str:
    """`<|user|>\\nTEXT`, with `/nothink` appended in non-thinking mode unless already there."""
    text = _visible_text(message.get("content", _NO_CONTENT))
    if not enable_thinking and not text.endswith(_NOTHINK):
        text += _NOTHINK
    return "<|user|>\n" + text


def _render_assistant(message: Mapping[str, Any], *, keep_reasoning: bool) -> str:
    """`<|assistant|>\\n<think>REASONING</think>`, then `\\nCONTENT` if any, then tool calls.

    Without a string reasoning field, reasoning is split out of content that contains `</think>`
    (as in a raw model reply); with one, even an empty one, content is left as it is. Reasoning and
    content are both stripped of surrounding whitespace; turns before the last user message get
    an empty `<think></think>`.
    """
    content = _visible_text(message.get("content", _NO_CONTENT))
    reasoning = _reasoning_field(message)
    if not isinstance(reasoning, str):
        reasoning, content = _split_reasoning(content)
    parts = ["<|assistant|>\n<think>", reasoning.strip() if keep_reasoning else "", "</think>"]
    if content.strip():
        parts.append("\n" + content.strip())
    if message.get("tool_calls"):
        parts.append(render_tool_calls(message["tool_calls"]))
    return "".join(parts)


def _reasoning_field(message: Mapping[str, Any]) -> Any:
    """The message's reasoning under the first of its accepted names that is set (else None)."""
    return next((message[f] for f in _REASONING_FIELDS if message.get(f) is not None), None)


def _split_reasoning(content: str) -> tuple[str, str]:
    """Splits `[...<think>]REASONING</think>CONTENT` the way the template does.

    Reasoning is what lies between the last `<think>` before the first `</think>` and that
    `</think>`; content is what follows the last `</think>`. (The template also trims newlines
    where they meet the tags, which the stripping in `_render_assistant` makes moot.)
    """
    if "</think>" not in content:
        return "", content
    return content.split("</think>")[0].split("<think>")[-1], content.split("</think>")[-1]


def _render_tool_call(call: Mapping[str, Any]) -> str:
    """One `<tool_call>` block; `{"function": {...}}` wrappers are unwrapped when non-empty."""
    if not isinstance(call, Mapping):
        raise TypeError(f"a tool call must be a dict, got {type(call).__name__}")
    call = call.get("function") or call
    name, arguments = call.get("name"), call.get("arguments")
    if not isinstance(name, str):
        raise TypeError(f"tool call 'name' must be a string, got {name!r}")
    if not isinstance(arguments, Mapping):
        raise TypeError(f"arguments of tool call {name!r} must be a dict (json.loads a JSON string "
                        f"first), got {type(arguments).__name__}")
    args = "".join(f"<arg_key>{key}</arg_key>\n<arg_value>{_render_value(value)}</arg_value>\n"
                   for key, value in arguments.items())
    return f"\n<tool_call>{name}\n{args}</tool_call>"


def _render_value(value: Any) -> str:
    """Strings verbatim, anything else as JSON: the template's `v | tojson if v is not string`."""
    return value if isinstance(value, str) else _tojson(value)


def _render_tool(message: Mapping[str, Any], index: int, *, opens_observation: bool) -> str:
    """Tool results as `<|observation|>` + `\\n<tool_response>\\nRESULT\\n</tool_response>` each.

    A string result joins the `<|observation|>` of a tool message right before it. A list of
    results always opens its own `<|observation|>`, even after another tool message: a quirk of
    the template, kept.
    """
    content = message.get("content", _NO_CONTENT)
    if isinstance(content, str):
        return ("<|observation|>" if opens_observation else "") + _tool_response(content)
    if not isinstance(content, Iterable):
        raise TypeError(f"messages[{index}] (tool) content must be a string or a list, "
                        f"got {type(content).__name__}")
    return "<|observation|>" + "".join(_tool_response(_tool_output(item)) for item in content)


def _tool_output(item: Any) -> str:
    """A listed tool result: its `output` field if it has one, else the item itself, as jinja
    prints them (`str`, so None becomes "None" and a dict its Python repr)."""
    if isinstance(item, Mapping) and "output" in item:
        return str(item["output"])
    return str(item)


def _tool_response(text: str) -> str:
    return f"\n<tool_response>\n{text}\n</tool_response>"


def _visible_text(content: Any) -> str:
    """The template's `visible_text` macro: a string as is; a list joined from its text parts
    (`{"type": "text", "text": ...}` dicts and plain strings; other parts dropped); anything else
    printed with `str`, so a `None` content renders as the text "None", as jinja prints it."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, Mapping):
        return "".join(_part_text(part) for part in content)
    return str(content)


def _part_text(part: Any) -> str:
    if isinstance(part, Mapping):
        return str(part["text"]) if part.get("type") == "text" and "text" in part else ""
    return part if isinstance(part, str) else ""


def _tojson(value: Any) -> str:
    """transformers' `tojson` filter as the template calls it: `json.dumps` defaults (separators
    `", "` and `": "`, keys unsorted) with non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

# The tokens that end an assistant turn (GLM-4.5's eos_token_id list): the reply stops at the
# first of them, and whatever follows belongs to the next turn.
_STOP_TOKENS = ("<|user|>", "<|observation|>", "<|endoftext|>")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_CALL_OPEN, _CALL_CLOSE = "<tool_call>", "</tool_call>"
# Tags that structure a tool call. Inside one, `<think>` and `</think>` are plain text.
_CALL_TAG = re.compile(r"</?(?:tool_call|arg_key|arg_value)>")
# Tags that end the content, where only `<tool_call>` may follow.
_ANY_TAG = re.compile(r"</?(?:think|tool_call|arg_key|arg_value)>")


class _Malformed(Exception):
    """A defect in the model's output; parse_output turns it into the result's `error`."""

    def __init__(self, what: str, offset: int):
        super().__init__(f"{what} at offset {offset}")


def parse_output(text: str) -> dict[str, Any]:
    """Splits a model reply (the text generated after `<|assistant|>`) into its parts.

    Returns `{"reasoning": str, "content": str, "tool_calls": [{"name": str, "arguments": dict}],
    "error": None | str}`. The reply is read as `[<think>]REASONING</think>`, then CONTENT, then
    zero or more `<tool_call>` blocks separated only by whitespace; a `</think>` with no opening
    `<think>` makes everything before it reasoning (the prompt ended inside the thinking block).
    Reasoning, content and function names are stripped of surrounding whitespace; argument keys
    and values are kept verbatim.

    An argument value is decoded as JSON when it parses as a JSON number, boolean, null, array or
    object, and is kept as the raw string otherwise (a JSON string literal such as `"a"`, quotes
    included, stays as written, since the renderer never quotes strings). This mirrors the
    renderer, which writes strings verbatim and other values as JSON: the format itself cannot
    tell the string "123" from the number 123, and both parse back as 123.

    Model output is untrusted, so this never raises: the first malformation (unclosed tag, missing
    function name, duplicate argument, stray text or tag, nested `<tool_call>`) sets `error` to a
    message with its character offset in `text`, and the result keeps what parsed cleanly before
    it: reasoning, content, and the tool calls completed before the faulty one. An unclosed
    `<think>` (generation cut off while thinking) keeps the partial reasoning.
    """
    result: dict[str, Any] = {"reasoning": "", "content": "", "tool_calls": [], "error": None}
    reply = _cut_at_stop_token(text)
    try:
        pos = _parse_reasoning(reply, result)
        pos = _parse_content(reply, pos, result)
        _parse_tool_calls(reply, pos, result["tool_calls"])
    except _Malformed as err:
        result["error"] = str(err)
    return result


def _cut_at_stop_token(text: str) -> str:
    """The reply up to the first stop/role token the model emitted, if any."""
    found = [i for i in (text.find(token) for token in _STOP_TOKENS) if i != -1]
    return text[: min(found, default=len(text))]


def _parse_reasoning(reply: str, result: dict[str, Any]) -> int:
    """Fills `reasoning` and returns where content starts (0 when there is no reasoning).

    Without an opening `<think>`, a `</think>` closes reasoning only if it comes before any
    `<tool_call>`: after one, it is text inside an argument value.
    """
    start = _skip_space(reply, 0)
    opened = reply.startswith(_THINK_OPEN, start)
    body = start + len(_THINK_OPEN) if opened else start
    close = reply.find(_THINK_CLOSE)
    if not opened and -1 < reply.find(_CALL_OPEN) < close:
        close = -1
    if close == -1:
        if opened:
            result["reasoning"] = reply[body:].strip()
            raise _Malformed("unclosed <think> (no </think>)", start)
        return 0
    stray = reply.find(_THINK_OPEN, body, close)
    if stray != -1:
        raise _Malformed("unexpected <think> (reasoning can only open the reply)", stray)
    result["reasoning"] = reply[body:close].strip()
    return close + len(_THINK_CLOSE)


def _parse_content(reply: str, pos: int, result: dict[str, Any]) -> int:
    """Fills `content` with the text up to the first tag, which must open a tool call."""
    tag = _ANY_TAG.search(reply, pos)
    end = tag.start() if tag else len(reply)
    result["content"] = reply[pos:end].strip()
    if tag and tag.group() != _CALL_OPEN:
        raise _Malformed(f"unexpected {tag.group()} in the content", tag.start())
    return end


def _parse_tool_calls(reply: str, pos: int, calls: list[dict[str, Any]]) -> None:
    """Appends each `<tool_call>` block from `pos` on; only whitespace may separate them."""
    while pos < len(reply):
        call, pos = _parse_tool_call(reply, pos)
        calls.append(call)
        pos = _skip_space(reply, pos)
        if pos < len(reply) and not reply.startswith(_CALL_OPEN, pos):
            raise _Malformed("unexpected text after </tool_call>", pos)


def _parse_tool_call(reply: str, start: int) -> tuple[dict[str, Any], int]:
    """Parses `<tool_call>NAME\\n(<arg_key>K</arg_key><arg_value>V</arg_value>)*</tool_call>`
    at `start`; returns the call and the offset after `</tool_call>`."""
    name, pos = _parse_function_name(reply, start)
    arguments: dict[str, Any] = {}
    while True:
        tag = _CALL_TAG.search(reply, pos)
        if tag is None:
            raise _Malformed(f"unclosed <tool_call> ({name})", start)
        _expect_space(reply, pos, tag.start())
        if tag.group() == _CALL_CLOSE:
            return {"name": name, "arguments": arguments}, tag.end()
        if tag.group() == _CALL_OPEN:
            raise _Malformed(f"nested <tool_call> inside the call to {name}", tag.start())
        if tag.group() != "<arg_key>":
            raise _Malformed(f"unexpected {tag.group()} in the call to {name}", tag.start())
        key, pos = _parse_argument(reply, tag, arguments)
        arguments[key], pos = _parse_value(reply, pos, key, key_at=tag.start())


def _parse_function_name(reply: str, start: int) -> tuple[str, int]:
    """The function name: the first line after `<tool_call>`, up to any tag; returns it and
    the offset where its line ends (anything after it on later lines is an error)."""
    pos = start + len(_CALL_OPEN)
    tag = _CALL_TAG.search(reply, pos)
    end = tag.start() if tag else len(reply)
    first = _skip_space(reply, pos, end)
    if first == end:
        raise _Malformed("<tool_call> without a function name", start)
    line_end = reply.find("\n", first, end)
    name_end = end if line_end == -1 else line_end
    return reply[first:name_end].strip(), name_end


def _parse_argument(reply: str, key_tag: re.Match, arguments: dict[str, Any]) -> tuple[str, int]:
    """An `<arg_key>` element (verbatim key, new to this call); returns it and the end offset."""
    key, pos = _parse_element(reply, key_tag, "</arg_key>")
    if key in arguments:
        raise _Malformed(f"duplicate argument {key!r}", key_tag.start())
    return key, pos


def _parse_value(reply: str, pos: int, key: str, *, key_at: int) -> tuple[Any, int]:
    """The `<arg_value>` element that must follow argument `key` (whose tag is at `key_at`);
    returns its decoded value and the end offset."""
    tag = _CALL_TAG.search(reply, pos)
    if tag is None or tag.group() != "<arg_value>":
        raise _Malformed(f"<arg_key>{key}</arg_key> without an <arg_value>", key_at)
    _expect_space(reply, pos, tag.start())
    raw, end = _parse_element(reply, tag, "</arg_value>")
    return _decode_value(raw), end


def _parse_element(reply: str, open_tag: re.Match, closing: str) -> tuple[str, int]:
    """The text between `open_tag` and its `closing` tag, which must be the next tool-call tag."""
    close = _CALL_TAG.search(reply, open_tag.end())
    if close is None or close.group() != closing:
        raise _Malformed(f"unclosed {open_tag.group()}", open_tag.start())
    return reply[open_tag.end():close.start()], close.end()


def _decode_value(raw: str) -> Any:
    """JSON numbers, booleans, null, arrays and objects decoded; any other text kept as is."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    return raw if isinstance(value, str) else value


_SPACE = re.compile(r"\s*")


def _skip_space(text: str, pos: int, end: int | None = None) -> int:
    """The offset of the first non-whitespace character in `text[pos:end]`, else `end`. A
    regex match from `pos`, never a copy of the rest of the text: parsing stays linear."""
    return _SPACE.match(text, pos, len(text) if end is None else end).end()


def _expect_space(reply: str, pos: int, end: int) -> None:
    """Raises if `reply[pos:end]`, the gap between two tags, holds anything but whitespace."""
    garbage = _skip_space(reply, pos, end)
    if garbage != end:
        raise _Malformed("unexpected text between tool-call tags", garbage)
