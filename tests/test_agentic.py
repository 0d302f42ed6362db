"""Agentic RL: the calculator environment (exact arithmetic, errors as observations, no `eval`),
the multi-turn task's SFT record, multi-turn episodes played against a scripted policy (so the
tokens the model wrote are known: the completion, its loss mask and old_logp checked position by
position against the chat template), their failure modes (malformed calls, max_turns, token
budget, broken environments), mixed single-/multi-turn groups, and `grpo()` with
`rl.env="calculator"` end to end on a tiny SFT'd policy."""

import builtins
import re

import numpy as np
import pytest

from glm_jax.data import tasks, train_bpe
from glm_jax.data.chat import render_text, tokenize_conversation
from glm_jax.data.tokenizer import EOT
from glm_jax.infer.chat import render_chat
from glm_jax.infer.engine import Generation, SamplingConfig
from glm_jax.rl import agentic, evaluate
from glm_jax.rl.agentic import EpisodeStats, play_episodes, rollout_with_environment
from glm_jax.rl.environments import CalculatorEnvironment, calculate, environment_for
from glm_jax.rl.grpo import rollout_batch
from glm_jax.rl.rewards import RewardPool

CALL = ("\n<think>I call the calculator.</think>\n<tool_call>calculator\n<arg_key>expression"
        "</arg_key>\n<arg_value>{}</arg_value>\n</tool_call><|observation|>")
ANSWER = "\n<think>The calculator returned {0}.</think>\n\\boxed{{{0}}}" + EOT


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [render_text(tasks.conversation(p)) for p in tasks.problems("train", 40)]
    return train_bpe(texts, 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def _problem(product=42):
    return tasks.Problem(key=f"calc_answer:test{product}", kind="calculator_answer",
                         prompt="What is 6 times 7? Use the calculator.", reasoning="",
                         answer="", reward="math", reference=str(product),
                         tools=(tasks.CALCULATOR_TOOL,))


class ScriptedPolicy:
    """Stands in for `generate`: the reply to a context is `turns[k]` for its k-th model turn
    (k = the `<|assistant|>` tokens in the context less one), cut at max_new_tokens; the j-th
    token of turn k gets the log-prob -(k + 1) - j / 100, so every position is recognisable."""

    def __init__(self, tokenizer, turns):
        self.tokenizer, self.calls = tokenizer, []
        self.turns = [tokenizer.encode(t, add_special_tokens=False).ids for t in turns]
        self.assistant = tokenizer.token_to_id("<|assistant|>")

    def logprobs(self, turn):
        return [-(turn + 1) - j / 100 for j in range(len(self.turns[turn]))]

    def __call__(self, model, prompts, *, max_new_tokens, **_):
        self.calls.append((len(prompts), max_new_tokens))
        tokens = np.zeros((len(prompts), max_new_tokens), np.int32)
        logps = np.zeros((len(prompts), max_new_tokens), np.float32)
        lengths = np.zeros(len(prompts), np.int32)
        for row, prompt in enumerate(prompts):
            turn = min(list(prompt).count(self.assistant) - 1, len(self.turns) - 1)
            reply = self.turns[turn][:max_new_tokens]
            tokens[row, :len(reply)], lengths[row] = reply, len(reply)
            logps[row, :len(reply)] = self.logprobs(turn)[:len(reply)]
        return Generation(tokens, logps, lengths)


def _play(monkeypatch, tokenizer, turns, *, environment=CalculatorEnvironment, max_turns=3,
          max_new_tokens=400, problems=None, n=1):
    policy = ScriptedPolicy(tokenizer, turns)
    monkeypatch.setattr(agentic, "generate", policy)
    stats = EpisodeStats()
    episodes = play_episodes(None, tokenizer, problems or [_problem()], RewardPool(workers=0),
                             environment, n=n, max_new_tokens=max_new_tokens,
                             max_turns=max_turns, batch_size=4, stats=stats)
    return episodes, stats, policy


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---- the calculator --------------------------------------------------------------------------

def test_calculator_evaluates_arithmetic_exactly_and_answers_errors(monkeypatch, tmp_path):
    assert calculate("606 * 10") == 6060
    assert calculate("2 + 3 * (4 - -1)") == 17 and calculate("7 / 2") == pytest.approx(3.5)
    env = CalculatorEnvironment()
    assert env.reset(_problem()) == ""

    def answer(name="calculator", **arguments):
        observation, done, reward = env.step([{"name": name, "arguments": arguments}])
        assert done is False and reward == 0.0
        return observation

    assert answer(expression="12 * 34") == "408" and answer(expression="7 / 2") == "3.5"
    assert answer(expression=55) == "55"  # parse_output decodes a bare number as JSON
    for bad, message in [("1 / 0", "division by zero"), ("2 ** 8", "unsupported Pow"),
                         ("1.5 * 2", "unsupported Constant"), ("12 *", "not an arithmetic"),
                         ("x + 1", "unsupported Name"), ("9" * 300, "longer than 200")]:
        observation = answer(expression=bad)
        assert observation.startswith("error: ") and message in observation, bad
    assert answer(name="search", query="x").startswith("error: unknown tool 'search'")
    assert answer(expr="1") == answer() == "error: calculator takes one argument, 'expression'"
    assert answer(expression=True) == "error: 'expression' must be a string"
    two = env.step([{"name": "calculator", "arguments": {"expression": "2 * 3"}},
                    {"name": "nope", "arguments": {}}])[0].splitlines()
    assert two[0] == "6" and two[1].startswith("error: unknown tool")
    # never eval: code is refused without running, and the calculator works with eval gone
    target = tmp_path / "pwned"
    for code in (f"open({str(target)!r}, 'w')", "__import__('os').system('true')",
                 "(lambda: 1)()", "[1][0]", "1 if 1 else 2"):
        assert answer(expression=code).startswith("error: unsupported"), code
    assert not target.exists()
    monkeypatch.setattr(builtins, "eval", None)
    monkeypatch.setattr(builtins, "exec", None)
    assert answer(expression="(1 + 2) * 3") == "9"


# ---- the multi-turn task -----------------------------------------------------------------------

def test_the_task_renders_call_observation_answer_with_an_assistant_only_mask(tokenizer):
    problem = tasks.problems("train", 1, kinds=("calculator_answer",))[0]
    a, b = map(int, re.findall(r"\d+", problem.prompt))
    assert problem.reference == str(a * b) and problem.reward == "math"
    assert environment_for(problem.kind) == "calculator" and environment_for("add") == ""
    record = tasks.conversation(problem)
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    ids, mask = tokenize_conversation(tokenizer, record)
    text = render_chat(record["messages"], tools=record["tools"]) + EOT
    whole = tokenizer.encode(text, add_special_tokens=False)
    assert ids.tolist() == whole.ids
    call_start = text.index("<|assistant|>", text.index("<|user|>")) + len("<|assistant|>")
    call_end = text.index("<|observation|>") + len("<|observation|>")
    answer_start = text.rindex("<|assistant|>") + len("<|assistant|>")
    spans = [(call_start, call_end), (answer_start, len(text))]
    assert mask.tolist() == [any(x <= s and e <= y for x, y in spans) for s, e in whole.offsets]
    trained = tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert f"<arg_value>{a} * {b}</arg_value>" in trained
    assert trained.endswith(f"\\boxed{{{a * b}}}{EOT}") and "<tool_response>" not in trained
    context = tokenizer.decode(ids[~mask].tolist(), skip_special_tokens=False)
    assert f"<tool_response>\n{a * b}\n</tool_response><|assistant|>" in context


def test_adding_the_kind_left_the_other_kinds_problems_as_they_were():
    old = ("add", "sort", "calculator")
    for split in ("train", "heldout"):
        mixed = [p for p in tasks.problems(split, 40) if p.kind in old]
        assert mixed == tasks.problems(split, len(mixed), kinds=old)


# ---- episodes against a scripted policy -----------------------------------------------------

def test_a_three_turn_episode_trains_exactly_the_tokens_the_model_wrote(monkeypatch, tokenizer):
    turns = [CALL.format("2 * 3"), CALL.format("6 * 7"), ANSWER.format(42)]
    episodes, stats, policy = _play(monkeypatch, tokenizer, turns)
    (completion,), (mask,), (logps,) = (episodes.samples.token_ids, episodes.masks,
                                        episodes.samples.logprobs)
    # the environment's turns as GLM-4.5's template writes them, by hand
    observations = [_ids(tokenizer, f"\n<tool_response>\n{v}\n</tool_response><|assistant|>")
                    for v in (6, 42)]
    model = policy.turns
    assert list(completion) == model[0] + observations[0] + model[1] + observations[1] + model[2]
    assert list(mask) == ([1] * len(model[0]) + [0] * len(observations[0]) + [1] * len(model[1])
                          + [0] * len(observations[1]) + [1] * len(model[2]))
    expected_logp = (policy.logprobs(0) + [0.0] * len(observations[0]) + policy.logprobs(1)
                     + [0.0] * len(observations[1]) + policy.logprobs(2))
    np.testing.assert_allclose(logps, expected_logp, rtol=1e-6)
    # prompt + completion is the whole conversation as the template renders it
    messages = [{"role": "user", "content": _problem().prompt}]
    for expression, value in (("2 * 3", "6"), ("6 * 7", "42")):
        messages += [{"role": "assistant", "reasoning_content": "I call the calculator.",
                      "content": "", "tool_calls": [{"name": "calculator",
                                                     "arguments": {"expression": expression}}]},
                     {"role": "tool", "content": value}]
    messages.append({"role": "assistant", "reasoning_content": "The calculator returned 42.",
                     "content": "\\boxed{42}"})
    prompt = episodes.samples.prompts[0]
    assert tokenizer.decode(list(prompt) + list(completion), skip_special_tokens=False) == (
        render_chat(messages, tools=[tasks.CALCULATOR_TOOL]) + EOT)
    assert episodes.scores.tolist() == [1.0] and episodes.samples.truncated == (False,)
    assert (stats.episodes, stats.turns, stats.tool_calls) == (1, 3, 2)
    assert len(policy.calls) == 3 and all(rows == 4 for rows, _ in policy.calls)  # fixed batch

    batch = rollout_batch([prompt], [completion], [logps], [1.0], seq_len=len(prompt) + 200,
                          completion_masks=[mask])
    first = len(prompt) - 1  # the position that predicts the first completion token
    expected_mask = np.zeros(len(prompt) + 200, np.float32)
    expected_mask[first:first + len(completion)] = mask
    expected_old = np.zeros(len(prompt) + 200, np.float32)
    expected_old[first:first + len(completion)] = np.asarray(logps) * np.asarray(mask)
    np.testing.assert_array_equal(batch["mask"][0, 0], expected_mask)
    np.testing.assert_allclose(batch["old_logp"][0, 0], expected_old, rtol=1e-6)
    targets = batch["target_ids"][0, 0]
    assert targets[expected_mask == 1].tolist() == model[0] + model[1] + model[2]
    assert np.all(expected_old[expected_mask == 0] == 0)
    with pytest.raises(ValueError, match="a mask of"):
        rollout_batch([prompt], [completion], [logps], [1.0], seq_len=len(prompt) + 200,
                      completion_masks=[mask[:-1]])


def test_a_call_ended_by_another_stop_token_gets_the_observation_token_inserted(monkeypatch,
                                                                                tokenizer):
    turns = [CALL.format("6 * 7").replace("<|observation|>", EOT), ANSWER.format(42)]
    episodes, _, policy = _play(monkeypatch, tokenizer, turns)
    observation = _ids(tokenizer, "<|observation|>\n<tool_response>\n42\n</tool_response>"
                                  "<|assistant|>")
    (completion,), (mask,) = episodes.samples.token_ids, episodes.masks
    assert list(completion) == policy.turns[0] + observation + policy.turns[1]
    assert list(mask) == [1] * len(policy.turns[0]) + [0] * len(observation) + [1] * len(
        policy.turns[1])
    assert episodes.scores.tolist() == [1.0]


def test_a_malformed_tool_call_ends_the_episode_with_reward_0(monkeypatch, tokenizer):
    broken = CALL.format("6 * 7").replace("</arg_value>", "")
    episodes, stats, policy = _play(monkeypatch, tokenizer, [broken, ANSWER.format(42)])
    assert episodes.samples.token_ids == (tuple(policy.turns[0]),)  # no observation, no turn 2
    assert episodes.masks == ((1,) * len(policy.turns[0]),)
    assert episodes.scores.tolist() == [0.0] and stats.malformed == 1 and len(policy.calls) == 1


def test_max_turns_bounds_an_episode_that_keeps_calling(monkeypatch, tokenizer):
    episodes, stats, policy = _play(monkeypatch, tokenizer, [CALL.format("6 * 7")], max_turns=2)
    observation = _ids(tokenizer, "\n<tool_response>\n42\n</tool_response><|assistant|>")
    assert list(episodes.samples.token_ids[0]) == policy.turns[0] + observation + policy.turns[0]
    assert episodes.scores.tolist() == [0.0] and episodes.samples.truncated == (True,)
    assert (stats.turns, stats.turn_limit, len(policy.calls)) == (2, 1, 2)


def test_the_token_budget_bounds_the_whole_completion(monkeypatch, tokenizer):
    call = _ids(tokenizer, CALL.format("6 * 7"))
    # room for the call but not its observation: the episode stops before inserting it
    episodes, stats, _ = _play(monkeypatch, tokenizer, [CALL.format("6 * 7")],
                               max_new_tokens=len(call) + 3)
    assert list(episodes.samples.token_ids[0]) == call and stats.out_of_tokens == 1
    assert episodes.scores.tolist() == [0.0] and episodes.samples.truncated == (True,)
    # a turn cut by the budget mid-call is malformed, and nothing exceeds the budget
    episodes, stats, policy = _play(monkeypatch, tokenizer, [CALL.format("6 * 7")],
                                    max_new_tokens=len(call) - 2)
    assert list(episodes.samples.token_ids[0]) == call[:-2] and stats.malformed == 1
    assert policy.calls == [(4, len(call) - 2)]


class Raises(CalculatorEnvironment):
    def step(self, tool_calls):
        raise RuntimeError("the tool server is down")


class BadReset(CalculatorEnvironment):
    def reset(self, problem):
        raise OSError("no sandbox")


class Junk(CalculatorEnvironment):
    def step(self, tool_calls):
        return {"not": "a string"}, False, 0.0


class Finishes(CalculatorEnvironment):
    def step(self, tool_calls):
        return "", True, 0.5


@pytest.mark.parametrize("environment, score, errors, turns", [
    (Raises, 0.0, 1, 1), (BadReset, 0.0, 1, 0), (Junk, 0.0, 1, 1), (Finishes, 0.5, 0, 1)])
def test_a_broken_environment_never_kills_the_rollout(monkeypatch, tokenizer, environment, score,
                                                      errors, turns):
    episodes, stats, policy = _play(monkeypatch, tokenizer,
                                    [CALL.format("6 * 7"), ANSWER.format(42)],
                                    environment=environment, problems=[_problem(), _problem(7)],
                                    n=2)
    assert episodes.scores.tolist() == [score] * 4
    assert stats.env_errors == errors * 4 and stats.turns == turns * 4
    assert len(policy.calls) == turns
    if errors:
        assert stats.last_error.split(":")[0] in ("RuntimeError", "OSError", "TypeError")
    assert stats.as_metrics()["env_errors"] == errors * 4


def test_mixed_problems_keep_their_order_and_masks(monkeypatch, tokenizer):
    policy = ScriptedPolicy(tokenizer, [CALL.format("6 * 7"), ANSWER.format(42)])
    monkeypatch.setattr(agentic, "generate", policy)
    monkeypatch.setattr(evaluate, "generate", policy)  # the single-turn rows
    add = tasks.problems("train", 2, kinds=("add",))
    problems = [add[0], _problem(), add[1]]
    groups = rollout_with_environment(None, tokenizer, problems, RewardPool(workers=0),
                                      env="calculator", max_turns=3, group_size=2,
                                      sampling=SamplingConfig(temperature=0.0),
                                      max_new_tokens=400, batch_size=4, seed=0)
    assert groups.problems == tuple(problems)
    rows = [m for m in groups.completion_masks]
    assert [set(m) for m in rows] == [{1}, {1}, {0, 1}, {0, 1}, {1}, {1}]
    assert [len(m) for m in rows] == [len(c) for c in groups.completions]
    assert groups.scores.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert groups.model_tokens()[2] == len(policy.turns[0]) + len(policy.turns[1])
    kept = groups.select([1])
    assert kept.completion_masks == groups.completion_masks[2:4]
    single = rollout_with_environment(None, tokenizer, add, RewardPool(workers=0), env="",
                                      max_turns=3, group_size=2,
                                      sampling=SamplingConfig(temperature=0.0),
                                      max_new_tokens=400, batch_size=4, seed=0)
    assert single.completion_masks is None  # the single-turn path, untouched
    joined = type(groups).concat([single, kept], 2)
    assert joined.completion_masks[:4] == tuple((1,) * len(c) for c in single.completions)
    assert joined.completion_masks[4:] == kept.completion_masks


# ---- grpo() with the calculator environment --------------------------------------------------

@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from configs import sft_tiny
    from glm_jax.train.sft import sft

    config = sft_tiny.get_config()
    config.workdir = str(tmp_path_factory.mktemp("sft"))
    config.model.overrides = dict(num_hidden_layers=2, max_position_embeddings=512)
    config.sft.train_problems = 64
    config.seq_len, config.batch_size = 128, 4
    config.steps = config.checkpoint_every = 1
    config.num_devices = 1
    config.eval.task = ""
    sft(config)
    return config.workdir


def test_grpo_trains_on_calculator_episodes(policy_dir, tmp_path, monkeypatch):
    """The barely trained policy is made to call the calculator on its first turn (the tokens
    forced, log-prob 0); its second turn is its own, generated after the observation."""
    from glm_jax.data.tokenizer import load_tokenizer
    from glm_jax.errors import ConfigError
    from glm_jax.rl.loop import grpo, grpo_base_config, validate_grpo

    tokenizer = load_tokenizer(f"{policy_dir}/tokenizer.json")
    call = _ids(tokenizer, "<tool_call>calculator\n<arg_key>expression</arg_key>\n"
                           "<arg_value>6*7</arg_value>\n</tool_call><|observation|>")
    assistant, real_generate = tokenizer.token_to_id("<|assistant|>"), agentic.generate

    def first_turn_calls(model, prompts, **kwargs):
        out = real_generate(model, prompts, **kwargs)
        tokens, logps, lengths = out.tokens.copy(), out.logprobs.copy(), out.lengths.copy()
        for row, prompt in enumerate(prompts):
            if list(prompt).count(assistant) == 1:
                tokens[row, :len(call)], logps[row], lengths[row] = call, 0.0, len(call)
        return Generation(tokens, logps, lengths)

    monkeypatch.setattr(agentic, "generate", first_turn_calls)
    config = grpo_base_config("grpo")
    config.workdir, config.init, config.num_devices = str(tmp_path / "run"), policy_dir, 1
    config.steps, config.schedule_steps, config.warmup_steps = 1, 2, 1
    config.seq_len = 256
    rl = config.rl
    rl.kinds, rl.env, rl.max_turns, rl.train_problems = "calculator_answer", "calculator", 2, 16
    rl.group_size, rl.groups_per_step, rl.rollout_batch_size = 2, 2, 4
    rl.max_new_tokens, rl.temperature, rl.reward_workers = 40, 1.0, 0
    config.eval.problems, config.eval.every = 2, 0
    config.eval.max_new_tokens, config.eval.batch_size = 40, 4
    logged = grpo(config)
    (step,) = [r for r in logged if "reward_mean" in r]
    (held_out,) = [r for r in logged if "eval_reward" in r]
    assert (step["env_episodes"], step["env_tool_calls"], step["env_turns_per_episode"]) == (
        4, 4, 2)
    # trained on the model's tokens only: the observations are in the completions, not the loss
    assert step["train_tokens"] == step["generated_tokens"] < 4 * step["response_len"]
    assert "eval_accuracy_calculator_answer" in held_out
    for bad, message in [(dict(env="chess"), "config.rl.env: 'chess'"),
                         (dict(max_turns=0), "rl.max_turns")]:
        wrong = config.copy_and_resolve_references()
        wrong.rl.update(bad)
        with pytest.raises(ConfigError, match=message):
            validate_grpo(wrong)
