"""Chat SFT of the `tiny` model on the built-in verifiable tasks (addition, sorting, calculator
tool calls), hybrid thinking: CPU, minutes. From a fresh model unless --config.init names a
training workdir or a Hugging Face directory. `configs/sft_tiny.py:N` trains N steps (the
schedule fitted to them) instead of 400."""

from glm_jax.train.sft import sft_base_config


def get_config(steps: str = "400"):
    config = sft_base_config()
    config.workdir = "workdir/sft_tiny"
    config.model.preset = "tiny"
    config.model.overrides = dict(num_hidden_layers=3, max_position_embeddings=1024)
    config.train_tokenizer = True  # from scratch: a BPE of the rendered conversations
    config.tokenizer_vocab_size = 512
    config.steps = int(steps)
    config.schedule_steps = int(steps)
    config.warmup_steps = 30
    config.peak_learning_rate = 1e-2
    config.floor_learning_rate = 1e-3
    config.seq_len = 256
    config.sft.kinds = "add,sort,calculator"  # the multi-turn kind: sft_tiny_agentic.py
    config.batch_size = 16
    config.log_every = 10
    config.checkpoint_every = 100
    config.eval.every = 100
    config.eval.problems = 60
    config.eval.max_new_tokens = 64
    return config
