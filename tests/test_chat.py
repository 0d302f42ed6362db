"""render_chat against GLM-4.5's official template, and parse_output.

Every clone checks render_chat against golden renderings made from the official template
(fixtures/chat_golden.json, by fixtures/make_chat_golden.py). Where the template file itself is
present (the shared/ folder beside the repository), the hand cases and random conversations are
also rendered live by jinja2 and the golden file is checked to be current; elsewhere those
tests are skipped, saying why."""

import functools
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm_jax.infer import parse_output, render_chat, render_tool_calls
from tests.chat_cases import CONVERSATIONS, FRAGMENTS, OPTIONS, SEARCH_TOOL
from tests.fixtures import make_chat_golden

TEMPLATE_PATH = make_chat_golden.DEFAULT_TEMPLATE
GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "chat_golden.json").read_text())["cases"]

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])
needs_template = pytest.mark.skipif(
    not TEMPLATE_PATH.is_file(),
    reason=f"the official chat template {TEMPLATE_PATH} is not beside this clone (it lives in "
           "the project's shared/ folder); the golden renderings cover render_chat without it")


@functools.cache
def _official_template():
    return make_chat_golden.load_template(TEMPLATE_PATH)


def reference(messages, *, tools=None, add_generation_prompt=False, enable_thinking=True):
    return make_chat_golden.render(_official_template(), dict(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking))


def assert_matches_template(messages, **kwargs):
    expected = reference(messages, **kwargs)
    assert render_chat(messages, **kwargs) == expected
    return expected


def _render(case):
    return render_chat(case["messages"], tools=case.get("tools"),
                       add_generation_prompt=case.get("add_generation_prompt", False),
                       enable_thinking=case.get("enable_thinking", True))


# ----------------------------------------------------------------------------------------------
# Golden renderings (every clone) and the live template (where it is present), byte for byte
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_matches_golden_rendering(case):
    assert _render(case) == case["text"]


def test_golden_covers_every_case():
    names = {c["name"] for c in GOLDEN}
    assert {f"{c}/{o}" for c in CONVERSATIONS for o in OPTIONS} <= names
    assert sum(n.startswith("random/") for n in names) >= 300


@needs_template
def test_golden_file_is_what_the_template_renders():
    stale = [c["name"] for c in GOLDEN if make_chat_golden.render(_official_template(), c) != c["text"]]
    assert not stale, f"rerun tests/fixtures/make_chat_golden.py: {stale[:5]}"


@needs_template
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_matches_official_template(messages, options):
    assert_matches_template(messages, **options)


def test_rules_spelled_out():
    """A few renders written out, so a reader sees the format (and the template's quirks)."""
    assert render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\nhi<|assistant|>")
    assert render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                       enable_thinking=False) == (
        "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>")
    assert render_chat(CONVERSATIONS["none_content_renders_as_text"]).endswith(
        "<|assistant|>\n<think></think>\nNone\n<tool_call>f\n<arg_key>a</arg_key>\n"
        "<arg_value>1</arg_value>\n</tool_call>")
    tools_prompt = render_chat([{"role": "user", "content": "x"}], tools=[SEARCH_TOOL])
    assert '\n{"name": "search", "description": "Web search", "parameters": {"type": "object"}}\n' \
        in tools_prompt
    assert "</tool_call><|user|>" in tools_prompt


def test_reasoning_aliases_like_transformers():
    """transformers feeds `thinking`/`reasoning` to the template as `reasoning_content`."""
    base = [{"role": "user", "content": "q"}]
    expected = render_chat(base + [{"role": "assistant", "content": "a", "reasoning_content": "r"}])
    for field in ("thinking", "reasoning"):
        aliased = base + [{"role": "assistant", "content": "a", field: "r",
                           "reasoning_content": None}]
        assert render_chat(aliased) == expected


def test_render_tool_calls():
    calls = [{"function": {"name": "f", "arguments": {"s": "1", "n": 1, "l": [1]}}}]
    assert render_tool_calls(calls) == (
        "\n<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>1</arg_value>\n<arg_key>n</arg_key>\n"
        "<arg_value>1</arg_value>\n<arg_key>l</arg_key>\n<arg_value>[1]</arg_value>\n</tool_call>")


@pytest.mark.parametrize("call, message", [
    ({"function": {"name": "f", "arguments": '{"a": 1}'}}, "must be a dict"),
    ({"arguments": {}}, "'name' must be a string"),
    ("f(a=1)", "tool call must be a dict"),
])
def test_bad_tool_calls_raise_clearly(call, message):
    with pytest.raises(TypeError, match=message):
        render_chat([{"role": "assistant", "content": "", "tool_calls": [call]}])


def test_bad_messages_raise_clearly():
    with pytest.raises(TypeError, match=r"messages\[1\] must be a dict"):
        render_chat([{"role": "user", "content": "x"}, "hello"])
    with pytest.raises(TypeError, match="tools must be a list of tool definitions"):
        render_chat([{"role": "user", "content": "x"}], tools="not a list")
    with pytest.raises(TypeError, match=r"tools\[1\] must be a dict"):
        render_chat([{"role": "user", "content": "x"}], tools=[SEARCH_TOOL, "search"])
    with pytest.raises(TypeError, match=r"messages\[0\] \(tool\) content must be a string"):
        render_chat([{"role": "tool", "content": None}])


# ----------------------------------------------------------------------------------------------
# Random conversations, byte for byte
# ----------------------------------------------------------------------------------------------

text = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS)), max_size=4).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6)
text_parts = st.lists(st.one_of(text, st.builds(lambda t: {"type": "text", "text": t}, text),
                                st.just({"type": "image", "url": "u"})), max_size=3)
content = st.one_of(text, text_parts)
arguments = st.dictionaries(text, json_values, max_size=4)
tool_calls = st.lists(st.one_of(
    st.builds(lambda n, a: {"function": {"name": n, "arguments": a}}, text, arguments),
    st.builds(lambda n, a: {"name": n, "arguments": a}, text, arguments)), max_size=2)


def _message(role, **fields):
    return st.fixed_dictionaries({"role": st.just(role), **fields})


messages = st.lists(st.one_of(
    _message("system", content=content),
    _message("user", content=content),
    st.builds(lambda m, reasoning, calls: {**m, **reasoning, **calls},
              _message("assistant", content=st.one_of(content, st.none())),
              st.one_of(st.just({}), st.builds(lambda r: {"reasoning_content": r},
                                               st.one_of(text, st.none()))),
              st.one_of(st.just({}), st.builds(lambda c: {"tool_calls": c}, tool_calls))),
    _message("tool", content=st.one_of(text, st.lists(st.one_of(
        text, st.builds(lambda o: {"output": o}, json_values),
        st.dictionaries(text, json_values, max_size=2)), max_size=2))),
), max_size=6)
tools = st.one_of(st.none(), st.lists(st.dictionaries(text, json_values, max_size=3), max_size=2))


@needs_template
@PROPERTY_SETTINGS
@given(messages=messages, tools=tools, add_generation_prompt=st.booleans(),
       enable_thinking=st.booleans())
def test_random_conversations_match_official_template(messages, tools, add_generation_prompt,
                                                      enable_thinking):
    assert_matches_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                            enable_thinking=enable_thinking)


# ----------------------------------------------------------------------------------------------
# parse_output
# ----------------------------------------------------------------------------------------------

def test_parse_typical_replies():
    assert parse_output("\n<think>Think.</think>\nHello.<|user|>") == {
        "reasoning": "Think.", "content": "Hello.", "tool_calls": [], "error": None}
    # Non-thinking mode: the prompt already closed the thinking block.
    assert parse_output("\nJust content.<|endoftext|>")["content"] == "Just content."
    # The prompt ended inside thinking: no opening tag.
    assert parse_output("still thinking\n</think>\nDone.") == {
        "reasoning": "still thinking", "content": "Done.", "tool_calls": [], "error": None}
    reply = ('\n<think>Need weather.</think>\nChecking.\n<tool_call>get_weather\n'
             '<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n'
             '<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n'
             '<arg_key>opts</arg_key>\n<arg_value>{"unit": "C"}</arg_value>\n</tool_call>\n'
             '<tool_call>ping\n</tool_call><|observation|>')
    assert parse_output(reply) == {
        "reasoning": "Need weather.", "content": "Checking.", "error": None,
        "tool_calls": [{"name": "get_weather",
                        "arguments": {"city": "Paris", "days": 3, "opts": {"unit": "C"}}},
                       {"name": "ping", "arguments": {}}]}


def test_parse_think_tags_inside_argument_values():
    reply = ("\nSaving.\n<tool_call>write\n<arg_key>text</arg_key>\n<arg_value><think>x</think>"
             "</arg_value>\n</tool_call>")
    assert parse_output(reply) == {
        "reasoning": "", "content": "Saving.", "error": None,
        "tool_calls": [{"name": "write", "arguments": {"text": "<think>x</think>"}}]}


def test_parse_reply_ends_at_first_stop_token():
    assert parse_output("answer<|user|>\nnext turn<|assistant|>")["content"] == "answer"


def test_value_decoding_and_its_ambiguity():
    """Strings render verbatim and other values as JSON, so text that parses as a JSON
    non-string comes back as that value; JSON string literals and other text stay verbatim."""
    rendered = render_tool_calls([{"name": "f", "arguments": {
        "s": "123", "n": 123, "quoted": '"a"', "bad_json": "{x}", "word": "true story",
        "t": "true"}}])
    assert parse_output(rendered)["tool_calls"][0]["arguments"] == {
        "s": 123, "n": 123, "quoted": '"a"', "bad_json": "{x}", "word": "true story", "t": True}


OK_CALL = "<tool_call>ok\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
# reply, what the error says, and the (unique) text the error's offset points at.
MALFORMED = {
    "unclosed_think": ("<think>cut off mid-thought", "unclosed <think>", "<think>cut"),
    "stray_think_in_reasoning": ("<think>a<think>b</think>", "unexpected <think>", "<think>b"),
    "stray_think_close_in_content": ("<think>r</think>text</think>more", "unexpected </think>",
                                     "</think>more"),
    "unclosed_tool_call": (OK_CALL + "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>",
                           "unclosed <tool_call>", "<tool_call>f"),
    "unclosed_arg_value": (OK_CALL + "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>1</tool_call>",
                           "unclosed <arg_value>", "<arg_value>1</tool_call>"),
    "unclosed_arg_key": ("<tool_call>f\n<arg_key>a\n<arg_value>1</arg_value></tool_call>",
                         "unclosed <arg_key>", "<arg_key>"),
    "missing_name": ("<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",
                     "without a function name", "<tool_call>"),
    "duplicate_key": ("<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>\n"
                      "<arg_key>a</arg_key><arg_value>2</arg_value></tool_call>",
                      "duplicate argument 'a'", "<arg_key>a</arg_key><arg_value>2"),
    "key_without_value": ("<tool_call>f\n<arg_key>a</arg_key>\n</tool_call>",
                          "without an <arg_value>", "<arg_key>"),
    "garbage_between_tags": ("<tool_call>f\n<arg_key>a</arg_key> junk <arg_value>1</arg_value>"
                             "</tool_call>", "unexpected text between tool-call tags", "junk"),
    "garbage_after_name": ("<tool_call>f\nstray line\n</tool_call>", "unexpected text between",
                           "stray"),
    "nested_tool_call": ("<tool_call>f\n<tool_call>g\n</tool_call></tool_call>",
                         "nested <tool_call>", "<tool_call>g"),
    "value_before_key": ("<tool_call>f\n<arg_value>1</arg_value></tool_call>",
                         "unexpected <arg_value>", "<arg_value>"),
    "text_after_tool_call": (OK_CALL + "\nmore prose", "unexpected text after </tool_call>",
                             "more prose"),
    "closing_tag_in_content": ("hello </tool_call>", "unexpected </tool_call> in the content",
                               "</tool_call>"),
}


@pytest.mark.parametrize("reply, message, at", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_output_sets_error(reply, message, at):
    assert reply.count(at) == 1
    result = parse_output(reply)
    assert result["error"] is not None and message in result["error"]
    assert result["error"].endswith(f"at offset {reply.index(at)}")


def test_malformed_output_keeps_what_parsed_before():
    result = parse_output("<think>r</think>text\n" + OK_CALL + "<tool_call>broken")
    assert result["reasoning"] == "r" and result["content"] == "text"
    assert result["tool_calls"] == [{"name": "ok", "arguments": {"a": 1}}]
    assert "unclosed <tool_call>" in result["error"]
    assert parse_output("<think>partial thought")["reasoning"] == "partial thought"


# Text the round trip can carry: no tags or stop tokens (the format has no escaping for them).
RESERVED = re.compile(r"</?(?:think|tool_call|arg_key|arg_value)>"
                      r"|<\|(?:user|observation|endoftext)\|>")
plain_text = st.text(st.characters(codec="utf-8"), max_size=12).filter(
    lambda s: not RESERVED.search(s))


def _is_json_non_string(s):
    try:
        return not isinstance(json.loads(s), str)
    except ValueError:
        return False


plain_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | plain_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3),
    max_leaves=6)
# A top-level string that reads as JSON comes back decoded: the format's inherent ambiguity.
argument_values = st.one_of(plain_json.filter(lambda v: not isinstance(v, str)),
                            plain_text.filter(lambda s: not _is_json_non_string(s)))
parsed_calls = st.lists(st.fixed_dictionaries({
    "name": st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,15}", fullmatch=True),
    "arguments": st.dictionaries(plain_text, argument_values, max_size=4)}), max_size=3)


def _assistant_reply(reasoning, content, calls):
    """What the model writes after `<|assistant|>` for this turn."""
    rendered = render_chat([{"role": "assistant", "content": content,
                             "reasoning_content": reasoning, "tool_calls": calls}])
    assert rendered.startswith("[gMASK]<sop><|assistant|>")
    return rendered.removeprefix("[gMASK]<sop><|assistant|>")


@PROPERTY_SETTINGS
@given(reasoning=plain_text, content=plain_text, calls=parsed_calls,
       stop=st.sampled_from(["", "<|user|>", "<|observation|>", "<|endoftext|>"]))
def test_render_then_parse_is_identity(reasoning, content, calls, stop):
    parsed = parse_output(_assistant_reply(reasoning, content, calls) + stop)
    assert parsed == {"reasoning": reasoning.strip(), "content": content.strip(),
                      "tool_calls": calls, "error": None}
    # == treats True as 1; the rendered text does not.
    assert render_tool_calls(parsed["tool_calls"]) == render_tool_calls(calls)


TAG_FRAGMENTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                 "<arg_value>", "</arg_value>", "<|user|>", "<|observation|>", "<|endoftext|>",
                 "<", ">", "/", "\n", " ", "f", "1", '"', "[", "{", "}", "tool_call", "arg_", ""]
tag_soup = st.lists(st.one_of(st.text(max_size=4), st.sampled_from(TAG_FRAGMENTS)),
                    max_size=30).map("".join)


@st.composite
def damaged_replies(draw):
    """A well-formed reply with up to three spans replaced by tag fragments."""
    reply = _assistant_reply(draw(plain_text), draw(plain_text), draw(parsed_calls))
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, len(reply)))
        end = draw(st.integers(start, min(len(reply), start + 12)))
        reply = reply[:start] + draw(st.sampled_from(TAG_FRAGMENTS)) + reply[end:]
    return reply


@PROPERTY_SETTINGS
@given(reply=st.one_of(tag_soup, damaged_replies()))
def test_parse_never_raises_and_is_stable(reply):
    """Any text gives a well-formed result; a clean parse renders back to text that parses
    the same."""
    result = parse_output(reply)
    assert set(result) == {"reasoning", "content", "tool_calls", "error"}
    if result["error"] is not None:
        offset = int(re.search(r"at offset (\d+)$", result["error"]).group(1))
        assert 0 <= offset <= len(reply)
        return
    again = parse_output(_assistant_reply(result["reasoning"], result["content"],
                                          result["tool_calls"]))
    assert json.dumps(again) == json.dumps(result)  # json.dumps: NaN-safe and strict on 1 vs True


def test_parse_is_linear_in_the_number_of_tool_calls():
    """100,000 calls parse (each offset scan starts where the last ended, no copies of the rest
    of the text; this took 21-73 s when it was quadratic)."""
    calls = [{"name": f"f{i}", "arguments": {"a": i}} for i in range(100_000)]
    result = parse_output("ok" + render_tool_calls(calls))
    assert result["error"] is None and result["tool_calls"] == calls
