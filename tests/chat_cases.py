"""Conversations rendered through GLM-4.5's official chat template: the hand-written cases
(each a corner of the template) and a seeded generator of random ones. The golden renderings in
fixtures/chat_golden.json are made from these by fixtures/make_chat_golden.py, so tests on a
plain clone (no official template beside it) still compare bytes."""

import random

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo actuelle — 天气 ☀",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "Ville"}},
                   "required": ["city"]}}}
SEARCH_TOOL = {"name": "search", "description": "Web search", "parameters": {"type": "object"}}

ALL_ARGUMENT_KINDS = {"city": "Paris", "days": 3, "ratio": 0.5,
                      "filters": {"unit": "°C", "n": [1, 2]}, "tags": ["a", "ü"],
                      "verbose": True, "strict": False, "cursor": None,
                      "number_as_string": "123", "empty": "", "multiline": "line 1\n  line 2\n"}

CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": "Hi!"}],
    "multi_turn_reasoning": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "  add them  "},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "  6\n", "reasoning_content": "\nadd again\n"},
        {"role": "assistant", "content": "Anything else?", "reasoning_content": ""}],
    "nothink_already_there": [{"role": "user", "content": "quick answer /nothink"},
                              {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "again/nothink"}],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need the tool.",
         "tool_calls": [{"type": "function", "id": "c1",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        {"name": "get_weather", "arguments": {"city": "Zürich"}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 17}'},
        {"role": "assistant", "content": "21 °C and 17 °C.", "reasoning_content": "Both in."}],
    "all_argument_kinds": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": ALL_ARGUMENT_KINDS}},
            {"name": "no_args", "arguments": {}}]}],
    "tool_content_lists": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"name": "search", "arguments": {"q": "x"}}]},
        {"role": "tool",
         "content": [{"output": "first"}, "second", {"output": {"n": 1}}, {"id": 7}]},
        {"role": "tool", "content": [{"output": "own observation again"}]},
        {"role": "tool", "content": "string after a list joins it"},
        {"role": "tool", "content": []}],
    "content_parts": [
        {"role": "system", "content": [{"type": "text", "text": "sys "}, "plain"]},
        {"role": "user", "content": [{"type": "text", "text": "look: "},
                                     {"type": "image", "url": "x"},
                                     {"type": "text", "text": "this"}, {"type": "text"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]}],
    "empty_and_missing_content": [
        {"role": "system", "content": ""}, {"role": "user", "content": ""},
        {"role": "assistant", "content": ""}, {"role": "user"}, {"role": "assistant"}],
    "none_content_renders_as_text": [
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"name": "f", "arguments": {"a": 1}}]}],
    "think_inside_content": [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nold answer"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "prefix <think>\n\nnew thoughts\n</think>\n\nnew answer"},
        {"role": "assistant", "content": "no opening tag</think>after"},
        {"role": "assistant", "content": "a</think>b</think>c"},
        {"role": "assistant", "content": "<think>kept</think>as content", "reasoning_content": ""}],
    "no_user_message": [{"role": "system", "content": "s"},
                        {"role": "assistant", "content": "hi", "reasoning_content": "kept"}],
    "unknown_role_dropped": [{"role": "developer", "content": "dropped"},
                             {"role": "user", "content": "u"}, {"role": "tool", "content": "t"}],
    "unicode": [{"role": "user", "content": "日本語 😀 \u00a0"},
                {"role": "assistant", "content": "ответ", "reasoning_content": "思考",
                 "tool_calls": [{"name": "翻訳",
                                 "arguments": {"テキスト": "é", "n": ["ß", 1.5]}}]}],
}

OPTIONS = {
    "default": {},
    "generation_prompt": {"add_generation_prompt": True},
    "nothink": {"enable_thinking": False},
    "nothink_generation_prompt": {"enable_thinking": False, "add_generation_prompt": True},
    "tools": {"tools": [WEATHER_TOOL, SEARCH_TOOL], "add_generation_prompt": True},
}


# Fragments that exercise the template's string rules when mixed into random text.
FRAGMENTS = ["</think>", "<think>", "\n", " ", "/nothink", "<tool_call>", "<arg_value>", "</"]
_ALPHABET = "ab zé日😀\n\t\"'{}<>/\\"


def _text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 4)):
        if rng.random() < 0.3:
            parts.append(rng.choice(FRAGMENTS))
        else:
            parts.append("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 8))))
    return "".join(parts)


def _json_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.randint(-10**6, 10**6)
    if kind == 3:
        return round(rng.uniform(-100, 100), rng.randint(0, 6))
    if kind in (4, 5):
        return _text(rng)
    if kind == 6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_text(rng): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _content(rng: random.Random):
    if rng.random() < 0.7:
        return _text(rng)
    parts = [_text(rng), {"type": "text", "text": _text(rng)}, {"type": "image", "url": "u"}]
    return [rng.choice(parts) for _ in range(rng.randint(0, 3))]


def _tool_call(rng: random.Random):
    arguments = {_text(rng): _json_value(rng) for _ in range(rng.randint(0, 4))}
    if rng.random() < 0.5:
        return {"function": {"name": _text(rng), "arguments": arguments}}
    return {"name": _text(rng), "arguments": arguments}


def _message(rng: random.Random):
    role = rng.choice(["system", "user", "assistant", "tool"])
    if role in ("system", "user"):
        return {"role": role, "content": _content(rng)}
    if role == "assistant":
        message = {"role": role, "content": _content(rng) if rng.random() < 0.9 else None}
        if rng.random() < 0.5:
            message["reasoning_content"] = _text(rng) if rng.random() < 0.8 else None
        if rng.random() < 0.4:
            message["tool_calls"] = [_tool_call(rng) for _ in range(rng.randint(0, 2))]
        return message
    if rng.random() < 0.6:
        return {"role": role, "content": _text(rng)}
    items = [_text(rng), {"output": _json_value(rng)}, {_text(rng): _json_value(rng)}]
    return {"role": role, "content": [rng.choice(items) for _ in range(rng.randint(0, 2))]}


def random_case(seed: int) -> dict:
    """One random conversation with random template options (JSON-serialisable)."""
    rng = random.Random(seed)
    tools = None
    if rng.random() < 0.4:
        tools = [{_text(rng): _json_value(rng) for _ in range(rng.randint(0, 3))}
                 for _ in range(rng.randint(0, 2))]
    return {"messages": [_message(rng) for _ in range(rng.randint(0, 6))], "tools": tools,
            "add_generation_prompt": rng.random() < 0.5, "enable_thinking": rng.random() < 0.5}
