"""The launcher's inference commands end to end on a Hugging Face-layout tiny checkpoint."""

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
