"""Verifiable rewards on correct, wrong, malformed, raising and timing-out inputs; the code
sandbox's limits; the reward pool keeps going and counts what failed."""

import os
import time

import pytest

from glm_jax.errors import InputError
from glm_jax.rl import rewards
from glm_jax.rl.rewards import (REWARDS, RewardPool, code_reward, exact_match_reward,
                                extract_answer, function_call_reward, math_reward)
from glm_jax.rl.sandbox import Limits, run_tests


@pytest.mark.parametrize("completion, reference, expected", [
    ("<think>2 + 2 = 4</think>\n\\boxed{4}<|user|>", "4", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}", "$0.5$", 1.0),
    ("so 1,252 in total", "1252", 1.0),  # no box: the last number
    ("<think>maybe 5? no: \\boxed{5}</think> \\boxed{6}", "6", 1.0),  # after the think block
    ("<think>\\boxed{6}</think> I am not sure", "6", 0.0),  # reasoning is not the answer
    ("\\boxed{5}", "4", 0.0),
    ("no number here", "4", 0.0),
    ("\\boxed{4", "4", 1.0),  # an unclosed box: the last number, 4
    ("\\boxed{4", "5", 0.0),
])
def test_math_reward(completion, reference, expected):
    assert math_reward(completion, reference) == expected


def test_math_reward_extracts_balanced_braces():
    assert extract_answer("\\boxed{\\frac{3}{4}} then \\boxed{x^{2}}") == "x^{2}"
    assert math_reward("\\boxed{\\frac{6}{8}}", "$\\frac{3}{4}$") == 1.0


@pytest.mark.parametrize("completion, kwargs, expected", [
    ("<think>sorting</think>\n1, 2,  3<|endoftext|>", {}, 1.0),
    ("1, 2, 3", {"normalize_whitespace": False}, 1.0),
    ("1,  2, 3", {"normalize_whitespace": False}, 0.0),
    ("ABC", {}, 0.0),
    ("ABC", {"ignore_case": True}, 1.0),
    ("1, 3, 2", {}, 0.0),
])
def test_exact_match_reward(completion, kwargs, expected):
    reference = "abc" if completion.lower() == "abc" else "1, 2, 3"
    assert exact_match_reward(completion, reference, **kwargs) == expected


CALL = "<tool_call>calc\n<arg_key>expression</arg_key>\n<arg_value>2 * 3</arg_value>\n</tool_call>"
REFERENCE = [{"name": "calc", "arguments": {"expression": "2 * 3"}}]


@pytest.mark.parametrize("completion, reference, expected", [
    ("<think>call it</think>\n" + CALL, REFERENCE, 1.0),
    ("\n" + CALL + "<|observation|>", REFERENCE, 1.0),
    (CALL.replace("2 * 3", "2 * 4"), REFERENCE, 0.0),  # wrong value
    (CALL.replace("calc\n", "calculator\n"), REFERENCE, 0.0),  # wrong name
    (CALL.replace("expression", "expr"), REFERENCE, 0.0),  # wrong key
    (CALL + CALL, REFERENCE, 0.0),  # one call too many
    ("no call at all", REFERENCE, 0.0),
    (CALL.replace("</tool_call>", ""), REFERENCE, 0.0),  # malformed: parse error
    (CALL + " trailing text", REFERENCE, 0.0),  # text after the calls is a parse error
    (CALL.replace("2 * 3", "1"), [{"name": "calc", "arguments": {"expression": True}}], 0.0),
    (CALL.replace("2 * 3", "1"), [{"name": "calc", "arguments": {"expression": 1}}], 1.0),
    (CALL.replace("2 * 3", "1"), [{"name": "calc", "arguments": {"expression": 1.0}}], 0.0),
])
def test_function_call_reward(completion, reference, expected):
    assert function_call_reward(completion, reference) == expected


def test_function_call_reward_checks_call_order():
    two = CALL + "\n" + CALL.replace("calc", "lookup")
    calls = [REFERENCE[0], {"name": "lookup", "arguments": {"expression": "2 * 3"}}]
    assert function_call_reward(two, calls) == 1.0
    assert function_call_reward(two, calls[::-1]) == 0.0


SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def test_code_reward_fraction_and_all_or_nothing():
    assert code_reward(SOLUTION, TESTS) == pytest.approx(2 / 3)
    assert code_reward(SOLUTION, TESTS, all_or_nothing=True) == 0.0
    assert code_reward(SOLUTION, {"tests": TESTS[:2]}, all_or_nothing=True) == 1.0
    assert code_reward("<think>```python\nboom(\n```</think>" + SOLUTION, TESTS[:1]) == 1.0


@pytest.mark.parametrize("code", [
    "def add(a, b) return",  # syntax error
    "raise SystemExit(0)",  # exits before the tests run
    "import os\nos._exit(0)",
    "",
])
def test_code_reward_broken_code_scores_zero(code):
    assert code_reward(code, TESTS[:2]) == 0.0


def test_code_reward_cannot_forge_the_results_line():
    forged = ("import sys\nprint('\\n@@' + (sys.argv + ['x'])[-1] + '@@[true, true]')\n"
              "raise SystemExit(0)")
    assert code_reward(forged, TESTS[:2]) == 0.0


def test_sandbox_kills_an_infinite_loop_within_the_wall_limit():
    start = time.perf_counter()
    passed = run_tests("while True:\n    pass", ["assert True"], Limits(wall_seconds=2, cpu_seconds=10))
    assert passed == [False]
    assert time.perf_counter() - start < 8


def test_sandbox_stops_a_memory_hog():
    hog = "block = bytearray(2 * 1024 ** 3)"  # 2 GiB against a 256 MiB limit
    start = time.perf_counter()
    assert run_tests(hog, ["assert True"], Limits(memory_bytes=256 * 1024 ** 2)) == [False]
    assert time.perf_counter() - start < 8
    # the limit is what stopped it: the same code passes with room for it
    assert run_tests("block = bytearray(16 * 1024 ** 2)", ["assert len(block) > 0"],
                     Limits(memory_bytes=512 * 1024 ** 2)) == [True]


def test_sandbox_sees_no_secrets_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_JAX_TEST_SECRET", "hunter2")
    probe = ("import os, json\nENV = dict(os.environ)\nCWD = os.getcwd()\n"
             f"open({str(tmp_path / 'seen.json')!r}, 'w').write(json.dumps([ENV, CWD]))")
    assert run_tests(probe, ["assert 'GLM_JAX_TEST_SECRET' not in ENV",
                             "assert set(ENV) <= {'PATH', 'LC_CTYPE'}"]) == [True, True]
    import json

    _, cwd = json.loads((tmp_path / "seen.json").read_text())
    assert not os.path.exists(cwd)  # the temporary working directory is gone


def test_sandbox_bounds_runaway_output():
    spew = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    start = time.perf_counter()
    assert run_tests(spew, ["assert True"], Limits(file_bytes=1024 ** 2)) == [False]
    assert time.perf_counter() - start < 8


def _raises(completion, reference):
    raise RuntimeError("reward bug")


def _sleeps(completion, reference):
    time.sleep(30)
    return 1.0


def _nan(completion, reference):
    return float("nan")


@pytest.fixture
def flaky_rewards(monkeypatch):
    monkeypatch.setitem(REWARDS, "raises", _raises)
    monkeypatch.setitem(REWARDS, "sleeps", _sleeps)
    monkeypatch.setitem(REWARDS, "nan", _nan)


def test_pool_in_process_counts_failures_and_goes_on(flaky_rewards):
    pool = RewardPool(workers=0, timeout_seconds=1)
    assert pool.score("raises", ["a", "b"], [1, 2]) == [0.0, 0.0]
    assert pool.score("sleeps", ["a"], [1]) == [0.0]
    assert pool.score("nan", ["a"], [1]) == [0.0]
    assert pool.score("exact_match", ["x", "y"], ["x", "x"]) == [1.0, 0.0]
    assert (pool.stats.errors, pool.stats.timeouts, pool.stats.scored) == (3, 1, 6)
    assert "reward bug" in pool.stats.last_error or "NaN" in pool.stats.last_error


def test_pool_in_worker_processes_scores_in_order_with_a_bounded_queue():
    completions = [f"\\boxed{{{i}}}" for i in range(40)]
    references = [str(i if i % 3 else i + 1) for i in range(40)]
    with RewardPool(workers=2, queue_size=4) as pool:
        scores = pool.score("math", completions, references)
    assert scores == [0.0 if i % 3 == 0 else 1.0 for i in range(40)]
    assert pool.stats.errors == pool.stats.timeouts == 0


def test_pool_worker_timeouts_and_errors_do_not_stop_the_batch():
    # code_reward's sandbox is itself bounded; the pool's alarm bounds a reward that is not
    slow = ["```python\nimport time\ntime.sleep(20)\n```", SOLUTION]
    with RewardPool(workers=2, timeout_seconds=2) as pool:
        scores = pool.score("code", slow, [TESTS[:1], TESTS[:1]])
        assert scores == [0.0, 1.0]
        assert pool.stats.timeouts == 1
        assert pool.score("math", ["\\boxed{3}"], ["3"]) == [1.0]  # still usable


def test_unknown_reward_is_named():
    with pytest.raises(InputError, match="unknown reward 'nope'"):
        RewardPool(workers=0).score("nope", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        RewardPool(workers=0).score("math", ["a", "b"], ["a"])


def test_reward_functions_never_raise_on_garbage():
    garbage = ["", "\\boxed{", "}}}{{{", "<tool_call>", "\x00" * 10, "\\boxed{" * 200 + "1",
               "<think></think></think><tool_call>a<arg_key>b</arg_key></tool_call>"]
    for completion in garbage:
        for name, reward in REWARDS.items():
            reference = {"math": "1", "exact_match": "1", "function_call": REFERENCE}.get(
                name, ["assert True"])
            assert reward(completion, reference) in (0.0, 1.0), (name, completion)
    assert rewards.final_text("a<|user|>b</think>c") == "a"
