"""The pre-training loop end to end on a very small config: loss falls, metrics files are
written, a stopped run resumes bit-exactly, and a kill -9 mid-save leaves a restorable
checkpoint."""

import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pretrain_tiny
from glm_jax import ConfigError
from glm_jax.data import load_tokenizer
from glm_jax.errors import CheckpointError
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.loop import load_workdir, pretrain


def _config(workdir, steps):
    config = pretrain_tiny.get_config()
    config.workdir = str(workdir)
    config.steps = steps
    config.num_devices = 1
    config.schedule_steps = 8
    config.warmup_steps = 2
    config.seq_len = 32
    config.batch_size = 4
    config.micro_batches = 2
    config.checkpoint_every = 4
    config.tokenizer_vocab_size = 300
    config.model.overrides = dict(num_hidden_layers=2)
    config.data.stdlib.max_files = 12
    config.data.bpe_sample_chars = 100_000
    return config


def _losses(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    pretrain(_config(workdir, 8))
    return workdir


def test_run_writes_metrics_and_learns(full_run):
    records = _losses(full_run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("loss", "ce_loss", "mtp_loss", "aux_loss", "grad_norm", "learning_rate",
                "max_vio", "tokens_per_second", "max_vio_per_layer", "expert_load"):
        assert key in records[0], key
    assert records[-1]["ce_loss"] < records[0]["ce_loss"]
    assert (full_run / "expert_load.png").stat().st_size > 1000
    assert any((full_run / "tensorboard").iterdir())
    assert Checkpointer(full_run / "checkpoints").latest_step() == 8


def test_stopped_run_resumes_exactly(full_run, tmp_path):
    pretrain(_config(tmp_path, 5))  # stops after step 5, checkpointing at 4 and 5
    pretrain(_config(tmp_path, 8))  # the same command with more steps continues from 5
    resumed, full = _losses(tmp_path), _losses(full_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit for bit on CPU


def test_bfloat16_momentum_run_resumes_exactly(full_run, tmp_path):
    """With the momentum stored in bfloat16 a stopped run continues bit for bit, and its losses
    are not the float32-momentum run's."""
    def config(workdir, steps):
        c = _config(workdir, steps)
        c.momentum_dtype = "bfloat16"
        return c

    pretrain(config(tmp_path / "full", 8))
    pretrain(config(tmp_path / "resumed", 5))
    pretrain(config(tmp_path / "resumed", 8))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["loss"] for r in full] != [r["loss"] for r in _losses(full_run)]


def test_load_workdir_restores_the_checkpoint_weights_only(full_run, monkeypatch):
    import glm_jax.train.loop as loop

    config = _config(full_run, 8)
    tokenizer = load_tokenizer(full_run / "tokenizer.json")
    optimizer, _ = loop.build_optimizer(config)
    model_cfg = loop.model_config(config, tokenizer.get_vocab_size())
    graphdef, like = loop.init_state(config, model_cfg, optimizer, loop.training_mesh(config))
    state, _ = Checkpointer(full_run / "checkpoints").restore(8, like, with_data=False)
    expected = nnx.merge(graphdef, state.params, state.buffers)

    monkeypatch.setattr(loop, "build_optimizer", lambda *a: pytest.fail("built an optimizer"))
    model, _ = load_workdir(full_run)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                                 nnx.to_flat_state(nnx.state(expected))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    ids = np.asarray([tokenizer.encode("def f(x):").ids], np.int32)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(expected(ids)))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(full_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(full_run, workdir)
    newest = workdir / "checkpoints" / "8"
    victim = max((p for p in newest.rglob("*") if p.is_file() and "state" in p.parts),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:len(victim.read_bytes()) // 2])  # truncated
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 4.1')  # a kill mid-write
    with caplog.at_level(logging.WARNING):
        pretrain(_config(workdir, 8))  # resumes from step 4, trains 5-8 again
    assert any("checkpoints/8 unreadable" in r.getMessage() for r in caplog.records)
    assert any("dropping a partly written line" in r.getMessage() for r in caplog.records)
    assert (workdir / "checkpoints" / "8.corrupt").is_dir()
    assert Checkpointer(workdir / "checkpoints").latest_step() == 8
    assert [r["loss"] for r in _losses(workdir)] == [r["loss"] for r in _losses(full_run)]


def test_resuming_with_another_optimizer_says_so_and_keeps_the_checkpoints(full_run, tmp_path):
    """A checkpoint of another state layout (here AdamW's moments, Muon's run wants momenta) is
    not damaged: it is refused by name, never set aside for an older one or a fresh start."""
    workdir = tmp_path / "run"
    shutil.copytree(full_run, workdir)
    config = _config(workdir, 12)
    config.optimizer = "adamw"
    with pytest.raises(CheckpointError, match=r"checkpoints/8 was written for another training "
                       r"state .* entries this run needs are absent .*\.mu"):
        pretrain(config)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
    assert load_workdir(workdir)[0] is not None  # its weights still load


def test_weights_of_another_layout_are_refused_not_set_aside(tmp_path):
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(3, {"params": {"w": jnp.ones(4)}, "opt": jnp.zeros(2)}, None)
    checkpointer.wait()
    like = {"params": {"w": jnp.zeros(4)}}
    np.testing.assert_array_equal(checkpointer.restore_weights(3, like)["params"]["w"], 1.0)
    with pytest.raises(CheckpointError, match=r"1 entries this run needs are absent \(e.g. "
                       r"\['params'\]\['v'\]\)"):
        checkpointer.restore_latest(lambda step: checkpointer.restore_weights(
            step, {"params": {"v": jnp.zeros(4)}}))
    assert checkpointer.latest_step() == 3 and (tmp_path / "3").is_dir()


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, numpy as np, jax.numpy as jnp
        from glm_jax.train.checkpoint import Checkpointer
        c = Checkpointer({str(tmp_path)!r})
        c.save(1, {{"w": jnp.ones((4,))}}, {{"pos": 1}})
        c.wait()
        c.save(2, {{"w": jnp.full((64, 1024, 1024), 2.0)}}, {{"pos": 2}})  # 256 MB, async
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    checkpointer = Checkpointer(tmp_path)
    step = checkpointer.latest_step()
    assert step in (1, 2)
    like = {"w": np.zeros((4,) if step == 1 else (64, 1024, 1024), np.float32)}
    state, data = checkpointer.restore(step, like)
    assert float(state["w"][0]) == step and data == {"pos": step}
    if any(p.name.startswith("2.") for p in tmp_path.iterdir()):  # killed mid-write (usual)
        assert step == 1
    checkpointer.save(3, {"w": np.full((4,), 3.0, np.float32)}, {"pos": 3})  # the rerun saves on
    checkpointer.wait()
    assert checkpointer.latest_step() == 3


def test_batch_size_warmup_schedule():
    from glm_jax.train.loop import accumulation_schedule

    config = _config("unused", 8)  # batch 4 in 2 micro-batches of 2 rows, seq 32
    assert [accumulation_schedule(config)(s) for s in range(3)] == [2, 2, 2]
    config.batch_warmup.start_batch = 2
    config.batch_warmup.ramp_tokens = 4 * 2 * 32  # four 2-row micro-batches' worth of tokens
    config.batch_warmup.stages = 2
    at = accumulation_schedule(config)
    assert [at(s) for s in range(5)] == [1, 1, 2, 2, 2]  # 64, 128 tokens seen: stage 0; then full
    assert accumulation_schedule(config)(3) == 2  # a resumed run recomputes the same steps


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "config.steps: must be an integer >= 1, got 0"),
    (dict(seq_len=1), "config.seq_len: must be an integer >= 2"),
    (dict(batch_size=6, micro_batches=4), "config.batch_size: 6 is not divisible by micro_batches 4"),
    (dict(warmup_steps=8), "config.warmup_steps: 8 must be < schedule_steps 8"),
    (dict(peak_learning_rate=float("nan")), "config.peak_learning_rate: must be a finite number"),
    (dict(muon_ns_dtype="float16"), "config.muon_ns_dtype: must be one of ('float32', 'bfloat16')"),
    (dict(momentum_dtype="fp8"), "config.momentum_dtype: must be one of ('float32', 'bfloat16')"),
    (dict(optimizer="sgd"), "config.optimizer: must be one of ('muon', 'adamw'), got 'sgd'"),
    (dict(mesh={"pipeline": 2}), "config.mesh: unknown axes ['pipeline']"),
    (dict(train_tokenizer=False), "config.tokenizer_path: is empty"),
    (dict(model=dict(preset="tiny", overrides=dict(hidden_size=-1))),
     "config.model: ModelConfig.hidden_size: must be a positive integer"),
    (dict(model=dict(preset="tiny", overrides=dict(num_nextn_predict_layers=0))),
     "config.step.mtp_weight: is 0.3 but the model has no MTP layer"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, change, message):
    config = _config(tmp_path / "run", 8)
    config.update(change)
    with pytest.raises(ConfigError) as error:
        pretrain(config)
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()
