"""The GRPO loop end to end on a small SFT'd policy: a stopped and restarted run logs exactly
what the uninterrupted run logs (policy, optimizer, prompt position, rng, the dynamic
temperature and the curriculum stage all restored), the step compiles once per run and
generation not at all after the first run, and the workdir holds eval_reward rows (greedy and
sampled), the temperature table, the curriculum's stage rows and cached pass counts, the
per-step metrics and the reward curve."""

import json

import pytest

from configs import sft_tiny
from glm_jax.infer import engine
from glm_jax.rl import grpo as grpo_lib
from glm_jax.rl import rewards
from glm_jax.rl.curriculum import pick_temperature
from glm_jax.rl.loop import grpo, grpo_base_config
from glm_jax.train.sft import sft

TIMING = ("_seconds", "_per_second")


def _odd_length(completion: str, reference) -> float:
    """A reward a barely trained policy earns about half the time: signal in every group."""
    return float(len(completion) % 2 == 1)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    config = sft_tiny.get_config()
    config.workdir = str(tmp_path_factory.mktemp("sft"))
    config.model.overrides = dict(num_hidden_layers=2, max_position_embeddings=256)
    config.tokenizer_vocab_size = 320
    config.sft.train_problems = 64
    config.seq_len, config.batch_size = 96, 4
    config.steps = config.checkpoint_every = 1
    config.num_devices = 1
    config.eval.task = ""
    sft(config)
    return config.workdir


@pytest.fixture()
def odd_length_reward(monkeypatch, tmp_path):
    monkeypatch.setitem(rewards.REWARDS, "odd_length", _odd_length)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {n}.", "reference": "",
                                           "reward": "odd_length"}) + "\n" for n in range(5)))
    return str(prompts)


def _config(policy_dir, prompts, workdir, steps):
    config = grpo_base_config("dapo")  # dynamic sampling and overlong shaping on
    config.workdir, config.init = str(workdir), policy_dir
    config.num_devices = 1
    config.steps, config.schedule_steps, config.warmup_steps = steps, 4, 1
    config.checkpoint_every, config.log_every = 2, 1
    config.peak_learning_rate = 1e-2
    config.seq_len, config.micro_batches = 80, 2
    rl = config.rl
    rl.task, rl.group_size, rl.groups_per_step, rl.max_rounds = prompts, 4, 2, 2
    rl.max_new_tokens, rl.overlong_cache, rl.rollout_batch_size = 16, 4, 8
    rl.reward_workers = 0  # in process: the test's reward is registered here only
    config.eval.task, config.eval.problems, config.eval.every = prompts, 3, 2
    config.eval.max_new_tokens, config.eval.batch_size, config.eval.samples = 16, 4, 2
    rl.dynamic_temperature.every, rl.dynamic_temperature.samples = 2, 2
    rl.dynamic_temperature.temperatures, rl.dynamic_temperature.tolerance = "0.5,2.5", 0.0
    # stage 2 from step 2 on a plateau that always holds (a rise of less than 1.1 over 1 step):
    # the split run resumes exactly at the switch, from the restored reward history
    cur = rl.curriculum
    cur.enabled, cur.pool, cur.samples, cur.zero_at, cur.nonzero_at = True, 5, 2, 1, 3
    cur.switch_step, cur.plateau_window, cur.plateau_delta = 0, 1, 1.1
    return config


def _rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def test_resumed_run_logs_what_the_uninterrupted_run_logs(policy_dir, odd_length_reward,
                                                          tmp_path):
    whole = tmp_path / "whole"
    traces = grpo_lib.TRACES["grpo_step"]
    grpo(_config(policy_dir, odd_length_reward, whole, steps=4))
    assert grpo_lib.TRACES["grpo_step"] == traces + 1  # four steps, one compilation

    split = tmp_path / "split"
    grpo(_config(policy_dir, odd_length_reward, split, steps=2))
    generation = dict(engine.TRACES)
    logged = grpo(_config(policy_dir, odd_length_reward, split, steps=4))
    assert dict(engine.TRACES) == generation  # rollouts and eval reuse their programs
    assert [r["step"] for r in logged if "reward_mean" in r] == [3, 4]  # continued, not redone

    expected, resumed = _rows(whole), _rows(split)
    assert resumed == expected
    steps = [r for r in expected if "reward_mean" in r]
    evals = [r for r in expected if "eval_reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    # two completions per problem at the rollout temperature: a mean of six 0/1 rewards
    assert all(r["eval_reward_sampled"] * 6 == pytest.approx(round(r["eval_reward_sampled"] * 6))
               for r in evals)
    tuned = [r for r in expected if "rollout_temperature" in r and "reward_mean" not in r]
    assert [r["step"] for r in tuned] == [2, 4]
    for row in tuned:  # the table, and the pick the rule makes from it
        table = {0.5: row["temperature_score_T0.5"], 2.5: row["temperature_score_T2.5"]}
        assert row["rollout_temperature"] == pick_temperature(table, tolerance=0.0)
    stages = [r for r in expected if "stage_prompts" in r]
    assert [(r["step"], r["curriculum_stage"]) for r in stages] == [(0, 1.0), (2, 2.0)]
    assert all(r["screened_prompts"] == 5 for r in stages)
    assert [r["curriculum_stage"] for r in steps] == [1.0, 1.0, 2.0, 2.0]
    cached = [json.loads(line) for line in (whole / "curriculum.jsonl").read_text().splitlines()]
    assert {(r["policy_step"], r["n"]) for r in cached} >= {(0, 2), (2, 1)}
    assert (split / "curriculum.jsonl").read_text() == (whole / "curriculum.jsonl").read_text()
    assert [r["rollout_temperature"] for r in steps] == [1.0, 1.0] + [
        tuned[0]["rollout_temperature"]] * 2  # steps 3-4 sample at the pick made after step 2
    for name in ("pg_loss", "grad_norm", "entropy", "kl", "clip_frac_low", "clip_frac_high",
                 "ratio_mean", "ratio_max", "ratio_min", "reward_std", "response_len",
                 "truncated_frac", "zero_std_group_frac", "groups_kept", "rounds"):
        assert all(name in r for r in steps), name
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy first update
    assert any(r["grad_norm"] > 0 for r in steps)
    assert (whole / "reward_curve.png").stat().st_size > 0
    assert (whole / "tokenizer.json").is_file() and (whole / "model_config.json").is_file()


def test_starting_policy_reads_a_hugging_face_directory(policy_dir, odd_length_reward,
                                                        tmp_path):
    import shutil
    from pathlib import Path

    import chex
    from flax import nnx

    from glm_jax.convert import save_hf
    from glm_jax.rl.loop import starting_policy, validate_grpo
    from glm_jax.train.loop import load_workdir, training_mesh

    model, workdir_tokenizer = load_workdir(policy_dir)
    hf_dir = tmp_path / "hf"
    save_hf(model, hf_dir)
    shutil.copyfile(Path(policy_dir) / "tokenizer.json", hf_dir / "tokenizer.json")
    config = _config(str(hf_dir), odd_length_reward, tmp_path / "run", steps=1)
    validate_grpo(config)
    loaded, tokenizer = starting_policy(config, training_mesh(config))
    assert tokenizer.get_vocab() == workdir_tokenizer.get_vocab()
    chex.assert_trees_all_close(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))


@pytest.mark.parametrize("replay", [False, True], ids=["own_routing", "routing_replay"])
def test_fp8_rollouts_log_the_mismatch_and_weight_it(policy_dir, odd_length_reward, tmp_path,
                                                     replay):
    config = _config(policy_dir, odd_length_reward, tmp_path / "fp8", steps=1)
    config.rl.fp8_rollouts, config.rl.tis_cap = True, 2.0
    config.rl.routing_replay = replay
    config.rl.curriculum.enabled, config.rl.dynamic_temperature.every = False, 0
    config.eval.task = ""
    (row,) = [r for r in grpo(config) if "reward_mean" in r]
    assert row["rollout_logp_mismatch"] > 0  # FP8 sampler vs float32 trainer
    assert 0 < row["is_weight_mean"] <= 2.0 and 0 <= row["is_capped_frac"] < 1
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old_logp is the trainer's own


@pytest.mark.parametrize("name", ["sft_tiny", "sft_tiny_careless", "sft_tiny_agentic",
                                  "grpo_tiny", "grpo_tiny_recipe"])
def test_tiny_post_training_configs_validate_and_chain_to_the_sft_that_fills_their_start(name):
    import importlib

    from glm_jax.rl.loop import validate_grpo
    from glm_jax.train.sft import load_config, validate_sft

    config = importlib.import_module(f"configs.{name}").get_config()
    (validate_grpo if name.startswith("grpo") else validate_sft)(config)
    if config.init_sft_config:  # the config it runs first must write where this one starts
        assert load_config(config.init_sft_config).workdir == config.init
