"""The launcher end to end: inference commands on a Hugging Face-layout tiny checkpoint, the
command list and help, and every user mistake as one line with exit status 2."""

import re
import shutil
import subprocess
import sys

import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, save_hf
from glm_jax.data import train_bpe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(GlmMoeModel(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0)), path)
    texts = ["def f(x):\n    return x + 1\n", "hello world, how are you?"] * 50
    tokenizer = train_bpe(texts, 300, path / "tokenizer.json")
    assert tokenizer.get_vocab_size() <= 512  # fits the tiny model's vocabulary
    return path


def _run(args, stdin=""):
    result = subprocess.run([sys.executable, "-m", "experiments", *args], input=stdin,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_generate_streams_a_continuation(checkpoint):
    out = _run(["generate", f"--checkpoint={checkpoint}", "--prompt=def f(", "--steps=6",
                "--temperature=0"])
    assert out.startswith("def f(") and len(out.strip()) > len("def f(")


def test_chat_answers_each_line(checkpoint):
    out = _run(["chat", f"--checkpoint={checkpoint}", "--steps=6", "--nothinking"],
               stdin="hello\nand again\n")
    assert out.count("assistant:") == 2


def _fails(args, message, stdin=""):
    result = subprocess.run([sys.executable, "-m", "experiments", *args], input=stdin,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "unknown command 'nosuch'"),
    (["pretrain", "--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
    (["pretrain", "--config=configs/pretrain_tiny.py", "--config.no_such_field=1"],
     "flag --config.no_such_field: the config has no field 'no_such_field'"),
    (["pretrain", "--config=configs/pretrain_tiny.py", "--config.steps=abc"],
     "flag --config.steps=abc: invalid literal for int()"),
    (["pretrain", "--config=configs/nosuch.py"], "--config: [Errno 2] No such file"),
    (["pretrain", "--config=configs/pretrain_tiny.py", "--config.batch_size=0"],
     "config.batch_size: must be an integer >= 1, got 0"),
    (["pretrain", "--config=configs/pretrain_tiny.py", "--config.checkpoint_every=0"],
     "config.checkpoint_every: must be an integer >= 1, got 0"),
    (["pretrain", "--config=configs/pretrain_glm45_mini.py"],
     "config.tokenizer_path: is empty: set it to the model's tokenizer.json, or set "
     "train_tokenizer=True"),
    (["bench", "--what=nope"], "--what must be one of"),
    (["sft", "--config=configs/sft_tiny.py", "--config.sft.nothink_fraction=2.0"],
     "config.sft.nothink_fraction: must be in [0, 1]"),
    (["sft", "--config=configs/sft_tiny.py", "--config.sft.flawed_fraction=1.5"],
     "config.sft.flawed_fraction: must be in [0, 1]"),
    (["sft", "--config=configs/sft_tiny.py", "--config.sft.data=nosuch.jsonl"],
     "config.sft.data: 'nosuch.jsonl' is neither 'builtin' nor a file"),
    (["sft", "--config=configs/sft_tiny.py", "--config.sft.kinds=add,chess"],
     "config.sft.kinds: kinds must be among"),
    (["grpo", "--config=configs/grpo_tiny.py", "--config.rl.kinds=add,chess"],
     "config.rl.kinds: kinds must be among"),
    (["grpo", "--config=configs/grpo_tiny.py:dapo", "--config.rl.overlong_cache=100"],
     "config.rl.overlong_cache: 100 exceeds rl.max_new_tokens 96"),
    (["grpo", "--config=configs/grpo_tiny.py:ppo"], "algorithm 'ppo': the presets are"),
    (["grpo", "--config=configs/grpo_tiny.py", "--config.rl.dynamic_temperature.every=5",
      "--config.rl.dynamic_temperature.temperatures=0.8,hot"],
     "config.rl.dynamic_temperature.temperatures: '0.8,hot' is not a comma-separated list"),
    (["grpo", "--config=configs/grpo_tiny.py", "--config.rl.curriculum.nonzero_at=8"],
     "config.rl.curriculum.nonzero_at: must be an integer >= 9, got 8"),
    (["grpo", "--config=configs/grpo_glm45_mini.py"],
     "config.init: 'workdir/sft_glm45_mini' is neither a training workdir nor a Hugging Face"),
    (["eval", "--checkpoint=.", "--k=0"], "--k must be comma-separated integers >= 1"),
    (["eval", "--checkpoint=.", "--k=1,8", "--samples=4"], "fewer than the largest k 8"),
    (["eval", "--checkpoint=.", "--modes=think,fast"], "--modes must be among think,nothink"),
    (["eval", "--checkpoint=.", "--task=nosuch.jsonl"], "--task 'nosuch.jsonl': neither"),
    (["eval", "--checkpoint=.", "--kinds=add,chess"], "--kinds: kinds must be among"),
    (["distill", "--out=x.jsonl"], "distill needs --teachers=DIR"),
    (["distill", "--teachers=.", "--samples=4", "--temperature=0"], "needs --out"),
    (["generate", "--checkpoint="], "needs --checkpoint=DIR"),
    (["plan", "--config=configs/pretrain_tiny.py", "--hbm_gib=45"],
     "--hbm_gib applies to a TPU plan: add --topology=..."),
    (["plan", "--config=configs/pretrain_tiny.py", "--topology=v5p:2x2x1", "--hbm_gib=0"],
     "--hbm_gib must be > 0, got 0.0"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message):
    _fails(args, message)


def test_nothing_is_created_before_the_config_is_checked(tmp_path):
    workdir = tmp_path / "run"
    _fails(["pretrain", "--config=configs/pretrain_tiny.py", "--config.steps=-5",
            f"--config.workdir={workdir}"], "config.steps: must be an integer >= 1, got -5")
    missing = tmp_path / "missing"
    _fails(["generate", f"--checkpoint={missing}"], f"--checkpoint {missing}: no such directory")
    (tmp_path / "empty").mkdir()
    _fails(["generate", f"--checkpoint={tmp_path / 'empty'}"], "neither a Hugging Face checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_bad_checkpoints_and_tokenizers_are_one_line(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"")
    _fails(["convert", f"--checkpoint={broken}"], "model.safetensors: not a safetensors file")
    big = tmp_path / "big_vocab"
    shutil.copytree(checkpoint, big)
    (big / "tokenizer.json").unlink()
    assert train_bpe(["".join(chr(0x4E00 + i) for i in range(800))] * 3, 1000,
                     big / "tokenizer.json").get_vocab_size() > 512
    _fails(["generate", f"--checkpoint={big}", "--steps=2"],
           "tokens, more than the model's vocab_size 512")


def test_command_list_and_help():
    listing = _run([])
    from experiments.commands import COMMANDS
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s+\S", listing, re.M), name
    help_text = _run(["pretrain", "--config=configs/pretrain_tiny.py", "--help"])
    assert "--config=" in help_text and "  steps = 60" in help_text and "  seq_len = 128" in help_text
    sft_help = _run(["sft", "--config=configs/sft_tiny.py", "--help"])
    assert "  sft.nothink_fraction = 0.25" in sft_help and "  eval.every = 100" in sft_help
    dapo_help = _run(["grpo", "--config=configs/grpo_tiny.py:dapo", "--help"])
    assert "  rl.eps_high = 0.28" in dapo_help and "  rl.dynamic_sampling = True" in dapo_help
    assert "--samples=1" in _run(["eval", "--help"]) and "--teachers=" in _run(["distill", "--help"])


def test_streamed_text_keeps_multibyte_characters(checkpoint):
    from experiments.commands import decoded_pieces
    from glm_jax.data import load_tokenizer

    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    text = "héllo wörld, 日本語 😀 — fin"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) // 2  # byte-level pieces: characters span several tokens
    assert "".join(decoded_pieces(tokenizer, ids)) == text


def test_demo_reports_learning_and_resumes(tmp_path):
    workdir = tmp_path / "demo"
    args = ["demo", f"--workdir={workdir}", "--steps=8", "--config=configs/demo_tiny.py",
            "--config.steps=3", "--config.schedule_steps=3", "--config.warmup_steps=1",
            "--config.eval.every=3", "--config.eval.heldout_chars=2000", "--config.seq_len=32",
            "--config.batch_size=2", "--config.log_every=1", "--config.tokenizer_vocab_size=300",
            "--config.model.overrides.num_hidden_layers=2", "--config.data.stdlib.max_files=51",
            "--config.data.bpe_sample_chars=50000", "--config.num_devices=1"]
    out = _run(args)
    assert "compiled the train step in" in out
    line = next(line for line in out.splitlines() if "bits per byte" in line)
    before, after = map(float, re.findall(r"(\d+\.\d+) (?:bits per byte )?at step", line))
    assert re.search(r"at step 0 -> .* at step 3$", line) and after < before
    assert "fill-in-the-middle" in out and f"checkpoint: {workdir / 'checkpoints' / '3'}" in out
    for png in ("loss.png", "expert_load.png"):
        assert f"{workdir / png}" in out and (workdir / png).stat().st_size > 1000
    again = _run(args)
    assert "resumed from step 3" in again and "compiled the train step" not in again
    assert line in again.splitlines()  # the same before/after, read back from metrics.jsonl
