"""Pre-train the `tiny` GLM-4.5-style MoE on the built-in Python-stdlib corpus: CPU, minutes."""

from glm_jax.train.config import base_config


def get_config():
    config = base_config()
    config.workdir = "workdir/pretrain_tiny"
    config.model.preset = "tiny"
    config.model.overrides = dict(num_hidden_layers=3, max_position_embeddings=1024)
    config.steps = 60
    config.schedule_steps = 60  # LR horizon: a run stopped early and resumed follows one schedule
    config.warmup_steps = 6
    config.peak_learning_rate = 1e-2  # tiny models tolerate (and need) a larger step
    config.floor_learning_rate = 1e-3
    config.seq_len = 128
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 20
    config.train_tokenizer = True  # a 512-token BPE on the stdlib corpus, trained once
    config.tokenizer_vocab_size = 512
    config.step.bias_rate = 1e-2  # a short run: let the balance biases move visibly
    return config
