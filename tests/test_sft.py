"""Chat SFT data: the assistant-only loss mask, data validation naming file and line, the chat
tokens as single tokens, the built-in task family (splits, worked answers its rewards accept,
thinking and non-thinking renderings), and a short SFT run end to end with its evaluation."""

import json
import re

import numpy as np
import pytest

from glm_jax.data import tasks, train_bpe
from glm_jax.data.chat import (load_conversations, render_text, sft_features,
                               tokenize_conversation, validate_conversation)
from glm_jax.data.sources import BadRecordError
from glm_jax.data.tokenizer import CHAT_TOKENS, EOT, check_chat_tokens
from glm_jax.errors import InputError
from glm_jax.infer.chat import render_chat
from glm_jax.rl.rewards import get_reward

WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}

# system, then three assistant turns: a tool call, an answer from the tool's result, and a
# thinking answer to a second question
TOOL_CONVERSATION = {"tools": [WEATHER_TOOL], "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "I should look it up.", "content": "",
     "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"sky\": \"clear\", \"celsius\": 21}"},
    {"role": "assistant", "content": "Clear, 21 C."},
    {"role": "user", "content": "And 2 + 2?"},
    {"role": "assistant", "reasoning_content": "Two and two.", "content": "4"},
]}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [render_text(tasks.conversation(p)) for p in tasks.problems("train", 60)]
    texts.append(render_text(TOOL_CONVERSATION))
    return train_bpe(texts, 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans the model writes, found in the rendered text by the format alone: from
    after each `<|assistant|>` to the end of the stop token that ends the turn."""
    spans = []
    for match in re.finditer(re.escape("<|assistant|>"), text):
        end = re.compile(r"<\|user\|>|<\|observation\|>").search(text, match.end())
        spans.append((match.end(), end.end() if end else len(text)))
    return spans


def test_mask_is_exactly_the_assistant_spans_of_a_tool_calling_conversation(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, TOOL_CONVERSATION)
    text = render_chat(TOOL_CONVERSATION["messages"], tools=TOOL_CONVERSATION["tools"]) + EOT
    whole = tokenizer.encode(text, add_special_tokens=False)
    assert ids.tolist() == whole.ids  # piecewise tokenisation equals the whole text's
    spans = _assistant_spans(text[:-len(EOT)])
    spans[-1] = (spans[-1][0], len(text))  # the last turn ends with <|endoftext|>
    expected = [any(a <= start and end <= b for a, b in spans) for start, end in whole.offsets]
    assert mask.tolist() == expected
    trained = tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
    # what the model writes: the tool call, both answers, the kept reasoning, the stop tokens
    assert "<tool_call>weather" in trained and "Clear, 21 C." in trained
    assert "Two and two." in trained and trained.count("<|observation|>") == 1
    assert trained.endswith("4" + EOT) and trained.count("<|user|>") == 1
    context = tokenizer.decode(ids[~mask].tolist(), skip_special_tokens=False)
    for never in ("You are terse.", "Weather in Paris?", "\"sky\"", "And 2 + 2?", "<tools>",
                  "<tool_response>"):
        assert never in context and never not in trained, never


def test_sft_features_shift_the_mask_onto_the_predicting_position(tokenizer):
    ids, mask = tokenize_conversation(tokenizer, tasks.conversation(tasks.problems("train", 1)[0]))
    features = sft_features(ids, mask)
    np.testing.assert_array_equal(features["target_ids"][:-1], ids[1:])
    np.testing.assert_array_equal(features["loss_mask"][:-1], mask[1:])
    assert features["loss_mask"][-1] == 0


def test_non_thinking_turns_render_nothink_and_an_empty_think_block(tokenizer):
    problem = tasks.problems("train", 1, kinds=("add",))[0]
    record = tasks.conversation(problem, thinking=False)
    text = render_text(record, thinking=False)
    assert "/nothink" in text and "<think></think>" in text and problem.reasoning not in text
    thinking = render_text(tasks.conversation(problem))
    assert "/nothink" not in thinking and f"<think>{problem.reasoning}</think>" in thinking


def test_chat_tokens_are_single_tokens(tokenizer, tmp_path):
    for token in CHAT_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False).ids) == 1, token
    check_chat_tokens(tokenizer, "trained")
    from tokenizers import Tokenizer, models, pre_tokenizers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    with pytest.raises(InputError, match=r"does not hold the chat tokens \['\[gMASK\]'"):
        check_chat_tokens(plain, "plain.json")


@pytest.mark.parametrize("line, message", [
    ("{not json", "Expecting property name"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role must be one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content must be a string"),
    ('{"messages": [{"role": "assistant", "content": "", "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{oops"}}]}]}',
     "messages[0].tool_calls[0]: 'arguments' is a string that is not JSON"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "tools": "weather"}',
     "tools must be a list"),
    ('[1, 2]', "a record must be a JSON object"),
])
def test_bad_conversations_are_named_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})
    path.write_text(good + "\n\n" + line + "\n" + good + "\n")
    with pytest.raises(BadRecordError) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert len(load_conversations(path, on_bad_record="skip")) == 2


def test_openai_wire_format_tool_arguments_are_decoded():
    record = validate_conversation({"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}]})
    assert record["messages"][1]["tool_calls"] == [{"function": {"name": "f", "arguments": {"a": 1}}}]


def test_task_splits_never_share_a_problem_and_are_deterministic():
    train = tasks.problems("train", 600)
    heldout = tasks.problems("heldout", 120)
    assert not {p.key for p in train} & {p.key for p in heldout}
    assert len({p.key for p in train}) == 600
    assert [p.key for p in tasks.problems("heldout", 120)] == [p.key for p in heldout]
    assert {p.kind for p in heldout} == set(tasks.KINDS)
    assert all(p.split == "heldout" for p in heldout)


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_worked_answers_earn_their_reward_and_wrong_ones_do_not(kind):
    for problem in tasks.problems("train", 20, kinds=(kind,)):
        reward = get_reward(problem.reward)
        record = tasks.conversation(problem)
        text = render_text(record)
        reply = text[text.rindex("<|assistant|>") + len("<|assistant|>"):] + "<|user|>"
        assert reward(reply, problem.reference) == 1.0, (problem.key, reply)
        if kind == "calculator":
            wrong = reply.replace(problem.reference[0]["arguments"]["expression"], "1 * 1")
        else:
            wrong = reply.replace(problem.answer, problem.answer.replace(
                problem.reference, problem.reference + "1"))
        assert reward(wrong, problem.reference) == 0.0, (problem.key, wrong)


def test_a_careless_teachers_sorting_is_descending_and_earns_nothing():
    for problem in tasks.problems("train", 12, kinds=("add", "sort")):
        flawed = tasks.flawed(problem)
        if problem.kind != "sort":
            assert flawed == problem
            continue
        numbers = [int(n) for n in flawed.answer.split(", ")]
        assert numbers == sorted(numbers, reverse=True) != sorted(numbers)
        assert flawed.reasoning.startswith("From the largest: ")
        assert flawed.reference == problem.reference and flawed.key == problem.key
        text = render_text(tasks.conversation(flawed))
        reply = text[text.rindex("<|assistant|>") + len("<|assistant|>"):] + "<|user|>"
        assert get_reward(flawed.reward)(reply, flawed.reference) == 0.0, reply


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_sft_data_takes_the_configured_fraction_from_the_careless_teacher(fraction):
    from glm_jax.train.sft import conversations, sft_base_config

    config = sft_base_config()
    config.sft.kinds, config.sft.train_problems = "sort", 400
    config.sft.flawed_fraction = fraction
    answers = [record["messages"][-1]["content"] for record in conversations(config)]
    descending = np.mean([[int(n) for n in a.split(", ")] != sorted(int(n) for n in a.split(", "))
                          for a in answers])
    # lists with all numbers equal look sorted either way, so the fraction is slightly below
    assert fraction - 0.07 <= descending <= fraction, descending
    assert conversations(config) == conversations(config)  # the same draw every time


def test_prompt_files_are_validated_with_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "reference": "2", "reward": "math"}) + "\n" +
                    json.dumps({"prompt": "x", "reference": "2", "reward": "bleu"}) + "\n")
    with pytest.raises(BadRecordError, match=re.escape(f"{path}:2: 'reward' must be one of")):
        tasks.load_problems(path)
    path.write_text(json.dumps({"prompt": "1+1?", "reference": "2", "reward": "math"}) + "\n")
    (problem,) = tasks.load_problems(path)
    assert (problem.prompt, problem.reward, problem.reference) == ("1+1?", "math", "2")
