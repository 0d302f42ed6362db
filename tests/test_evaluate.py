"""The evaluation harness and expert distillation: pass@k against the combinatorial definition,
task metrics, bits per byte against per-window forwards, the distillation selection, records
that load back as SFT data; and a short SFT run whose logged evaluation the `eval` command
reproduces from the saved workdir."""

import itertools
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_jax.config import ModelConfig
from glm_jax.data import tasks
from glm_jax.data.chat import load_conversations, render_text
from glm_jax.model import GlmMoeModel
from glm_jax.rl import pass_at_k
from glm_jax.rl.distill import Candidate, select_for_distillation, to_record, write_jsonl
from glm_jax.rl.evaluate import Samples, bits_per_byte, task_metrics


def _pass_at_k_by_enumeration(n, c, k):
    """The definition: the fraction of k-subsets of the n samples holding a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_combinatorial_fraction(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_large_n_and_bad_arguments():
    assert pass_at_k(512, 1, 512) == 1.0
    assert pass_at_k(512, 0, 8) == 0.0
    assert pass_at_k(1000, 3, 100) == pytest.approx(1 - math.comb(997, 100) / math.comb(1000, 100))
    for bad in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(TypeError):
        pass_at_k(4.0, 1, 1)


def _samples(kinds, n, texts, lengths):
    heldout = tasks.problems("heldout", 6)
    problems = tuple(next(p for p in heldout if p.kind == kind) for kind in kinds)
    return Samples(problems, n, ((1, 2),) * len(texts), tuple(texts),
                   tuple((1,) * L for L in lengths),
                   tuple((0.0,) * L for L in lengths), tuple(L >= 8 for L in lengths))


def test_task_metrics_per_kind_pass_at_k_and_lengths():
    samples = _samples(["add", "calculator"], 3, ["x"] * 6, [2, 4, 8, 8, 8, 6])
    rewards = np.array([1, 0, 0, 1, 1, 1], np.float32)
    out = task_metrics(samples, rewards, ks=(1, 2, 4))
    assert out["eval_accuracy"] == pytest.approx(4 / 6)
    assert out["eval_pass@1"] == pytest.approx((pass_at_k(3, 1, 1) + 1.0) / 2)
    assert out["eval_pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + 1.0) / 2)
    assert "eval_pass@4" not in out  # k > n
    assert out["eval_accuracy_add"] == pytest.approx(1 / 3)
    assert out["eval_function_call_accuracy"] == out["eval_accuracy_calculator"] == 1.0
    assert out["eval_response_len"] == pytest.approx(36 / 6)
    assert out["eval_truncated_frac"] == pytest.approx(3 / 6)


def test_bits_per_byte_equals_per_window_forwards():
    config = ModelConfig.preset("tiny")
    model = GlmMoeModel(config, rngs=nnx.Rngs(0))

    class Ids:  # a tokenizer of one token per byte
        @staticmethod
        def encode(text, add_special_tokens=False):
            return type("E", (), {"ids": list(text.encode())})

    texts = ["short text", "a longer text that needs three windows"]
    expected_nll, seq_len = 0.0, 16
    for text in texts:
        ids = list(text.encode())
        for start in range(0, len(ids) - 1, seq_len):
            window = jnp.asarray([ids[start:start + seq_len + 1]])
            logp = jax.nn.log_softmax(model(window[:, :-1]).astype(jnp.float32))
            expected_nll -= float(jnp.take_along_axis(logp, window[:, 1:, None], -1).sum())
    expected = expected_nll / math.log(2) / sum(len(t.encode()) for t in texts)
    assert bits_per_byte(model, Ids, texts, seq_len=seq_len) == pytest.approx(expected, rel=1e-5)


def _candidate(problem, length, reward=1.0, teacher="a", truncated=False, well_formed=True):
    return Candidate(problem, teacher, f"text{length}", reward, length, truncated, well_formed)


def test_distillation_keeps_exactly_the_verified_longer_half():
    p, q, r = tasks.problems("train", 3)
    candidates = [
        _candidate(p, 5), _candidate(p, 9), _candidate(p, 7, teacher="b"), _candidate(p, 12),
        _candidate(p, 30, reward=0.0),  # longest, but wrong
        _candidate(p, 40, truncated=True), _candidate(p, 50, well_formed=False),
        _candidate(q, 3), _candidate(q, 3, teacher="b"), _candidate(q, 2),  # 3 verified: keep 2
        _candidate(r, 8, reward=0.5),  # nothing verified: the prompt drops out
    ]
    kept = select_for_distillation(candidates)
    assert [(c.problem.key, c.length, c.teacher) for c in kept] == [
        (p.key, 12, "a"), (p.key, 9, "a"), (q.key, 3, "a"), (q.key, 3, "b")]
    assert [c.length for c in select_for_distillation(candidates, keep_fraction=1.0)] == [
        12, 9, 7, 5, 3, 3, 2]
    with pytest.raises(ValueError, match="keep_fraction"):
        select_for_distillation(candidates, keep_fraction=0)


def test_distilled_records_load_back_as_sft_conversations(tmp_path):
    kept = []
    single_turn = ("add", "sort", "calculator")  # a candidate is one reply, not an episode
    for problem in tasks.problems("train", 6, kinds=single_turn):
        text = render_text(tasks.conversation(problem))
        reply = text[text.rindex("<|assistant|>") + len("<|assistant|>"):] + "<|user|>"
        kept.append(Candidate(problem, "teacher-1", reply, 1.0, 40, False, True))
    path = tmp_path / "distilled.jsonl"
    write_jsonl([to_record(c) for c in kept], path)
    loaded = load_conversations(path)
    for candidate, conversation in zip(kept, loaded):
        assert render_text(conversation) == render_text(tasks.conversation(candidate.problem))
    provenance = [json.loads(line)["provenance"] for line in path.read_text().splitlines()]
    assert provenance[0] == {"teacher": "teacher-1", "problem": kept[0].problem.key,
                             "reward": 1.0, "length": 40}


# ---- a short SFT run, then the eval and distill commands on its workdir ----------------------

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from configs import sft_tiny
    from glm_jax.train.sft import sft

    config = sft_tiny.get_config()
    config.workdir = str(tmp_path_factory.mktemp("sft") / "run")
    config.steps = config.schedule_steps = 6
    config.warmup_steps = 2
    config.seq_len = 128
    config.batch_size = 8
    config.sft.train_problems = 300
    config.eval.every = 3
    config.eval.problems = 6
    config.eval.max_new_tokens = 12
    config.eval.batch_size = 8
    config.eval.reward_workers = 0
    config.checkpoint_every = 3
    config.log_every = 1
    logged = sft(config)
    return config, logged


def test_sft_logs_training_and_eval_rows_and_resumes(sft_run):
    config, logged = sft_run
    rows = [json.loads(line) for line in open(f"{config.workdir}/metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 3, 6]
    assert all("eval_nothink_accuracy" in r for r in rows if "eval_accuracy" in r)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from glm_jax.train.sft import sft

    assert sft(config) == []  # finished: a rerun resumes at the end and trains nothing
    assert len(open(f"{config.workdir}/metrics.jsonl").readlines()) == len(rows)


def _experiments(*args):
    result = subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_eval_command_reproduces_the_logged_evaluation(sft_run):
    config, _ = sft_run
    last = [json.loads(line) for line in open(f"{config.workdir}/metrics.jsonl")][-1]
    out = _experiments("eval", f"--checkpoint={config.workdir}", "--problems=6", "--steps=12",
                       "--batch_size=8", "--reward_workers=0", "--temperature=0",
                       f"--kinds={config.sft.kinds}")  # the held-out mix the SFT run scored
    rows = {r["mode"]: r for r in map(json.loads, [l for l in out.splitlines() if l.startswith("{")])}
    for mode, prefix in (("think", "eval_"), ("nothink", "eval_nothink_")):
        for name in ("accuracy", "response_len", "truncated_frac", "accuracy_calculator",
                     "bits_per_byte"):
            assert rows[mode][name] == pytest.approx(last[prefix + name], rel=1e-5), (mode, name)
    assert "| mode |" in out and "rewards: " in out


def test_distill_command_writes_sft_data_with_provenance(sft_run, tmp_path):
    config, _ = sft_run
    out = tmp_path / "distilled.jsonl"
    printed = _experiments("distill", f"--teachers={config.workdir},{config.workdir}",
                           "--split=train", "--problems=4", "--samples=2", "--temperature=1.0",
                           "--steps=12", "--batch_size=8", "--reward_workers=0", f"--out={out}")
    assert "16 responses to 4 prompts" in printed
    lines = out.read_text().splitlines()
    assert f"{len(lines)} kept" in printed
    for line in lines:
        assert set(json.loads(line)["provenance"]) == {"teacher", "problem", "reward", "length"}


def test_sft_from_a_workdir_starts_from_its_weights(sft_run, tmp_path):
    from glm_jax.train.sft import sft

    source, _ = sft_run
    config = source.copy_and_resolve_references()
    config.init, config.workdir = source.workdir, str(tmp_path / "continued")
    config.steps, config.schedule_steps, config.warmup_steps, config.eval.every = 1, 2, 1, 0
    logged = sft(config)
    source_last = [json.loads(line) for line in open(f"{source.workdir}/metrics.jsonl")][-1]
    first_eval = next(r for r in logged if "eval_accuracy" in r)
    assert first_eval["step"] == 0
    for name in ("eval_bits_per_byte", "eval_nothink_bits_per_byte", "eval_response_len"):
        assert first_eval[name] == pytest.approx(source_last[name], rel=1e-5), name
    with open(f"{source.workdir}/tokenizer.json") as f:
        assert (tmp_path / "continued" / "tokenizer.json").read_text() == f.read()


def test_sft_from_an_empty_workdir_first_runs_its_init_sft_config(sft_run, tmp_path):
    from glm_jax.train.sft import has_checkpoint, sft

    first = tmp_path / "first.py"
    first.write_text("from configs import sft_tiny\n\n\n"
                     "def get_config(steps):\n"
                     "    config = sft_tiny.get_config(steps)\n"
                     "    config.seq_len, config.batch_size, config.warmup_steps = 128, 8, 1\n"
                     "    config.sft.train_problems, config.eval.task = 300, ''\n"
                     "    return config\n")
    source, _ = sft_run
    config = source.copy_and_resolve_references()
    config.init, config.init_sft_config = str(tmp_path / "first_run"), f"{first}:2"
    config.workdir = str(tmp_path / "continued")
    config.steps, config.schedule_steps, config.warmup_steps, config.eval.task = 1, 2, 1, ""
    assert [r["step"] for r in sft(config) if "loss" in r] == [1]
    assert has_checkpoint(tmp_path / "first_run") and has_checkpoint(tmp_path / "continued")
    assert ((tmp_path / "first_run" / "tokenizer.json").read_text()
            == (tmp_path / "continued" / "tokenizer.json").read_text())
