"""The README demo: the `tiny` MoE pre-trained on the local Python stdlib for a few CPU minutes,
with held-out bits per byte (stdlib modules it never sees) before, during and after.

Tuned for the most learning per CPU-second on 2 cores (600-step trials at batch 8 x 128, held-out
bits per byte after; measured 2026-12-03):
  no MTP head: 40% more tokens per second (9,200 vs 6,500 at 16 x 256), the trials below
  BPE vocabulary 512 / 1,024 / 2,048 / 4,096: 2.98 / 2.76 / 2.51 / 2.39 (1.8 -> 3 bytes per token)
  peak learning rate 2e-2: 3.02 (1e-2: 2.98); sequences 256 x 4: 3.03 (128 x 8: 2.98)
  width 128 (4x the matmul FLOPs): 2.6x slower per token, not tried further
  batch 32 x 128 instead of 8 x 128 (a step's fixed cost dominates at this size: 1.65x the
  tokens per second): 2.05 at 600 steps, 1.954 at 800 (8 x 128, 800 steps: 2.30)
"""

from configs import pretrain_tiny


def get_config():
    config = pretrain_tiny.get_config()
    config.workdir = "workdir/demo"
    config.model.overrides = dict(config.model.overrides, num_nextn_predict_layers=0)
    config.step.mtp_weight = config.step.mtp_weight_after = 0.0
    config.tokenizer_vocab_size = 4096
    config.batch_size = 32
    config.steps = 800
    config.schedule_steps = 800
    config.warmup_steps = 50
    config.checkpoint_every = 200
    config.log_every = 10
    config.eval.heldout_chars = 40_000  # about 3 KB from each of the 14 held-out modules
    config.eval.every = 200
    return config
