"""Rollout-vs-trainer log-prob mismatch with and without MoE routing replay, on the sft_tiny
policy (workdir/sft_tiny: `python -m experiments sft --config=configs/sft_tiny.py` first).
Prints one JSON line per sampler (float32, FP8); figures in RESULTS.md."""
import json

import numpy as np
import optax

from glm_jax.data import tasks
from glm_jax.infer.engine import SamplingConfig
from glm_jax.infer.fp8 import quantize_model
from glm_jax.rl.grpo import make_policy_logp, rollout_batch
from glm_jax.rl.rollouts import rollout_groups
from glm_jax.rl.rewards import RewardPool
from glm_jax.train.loop import load_workdir
from glm_jax.train.step import TrainState
model, tok = load_workdir("workdir/sft_tiny")
problems = tasks.problems("train", 16, kinds=("add", "sort"))
graphdef, state = TrainState.create(model, optax.sgd(0.0))
logp = make_policy_logp(graphdef)
pool = RewardPool(workers=0)
for name, sampler in (("f32", model), ("fp8", quantize_model(model))):
    g = rollout_groups(sampler, tok, problems, pool, group_size=4, sampling=SamplingConfig(1.0),
                       max_new_tokens=64, batch_size=64, seed=0, record_routing=True)
    batch = rollout_batch(g.prompts, g.completions, g.logprobs, np.zeros(len(g.prompts)),
                          seq_len=128, temperature=1.0, routing=g.routing)
    mask = batch["mask"]
    row = {"sampler": name, "tokens": int(mask.sum())}
    for replay in (False, True):
        b = dict(batch) if replay else {k: v for k, v in batch.items() if k != "routing"}
        diff = np.abs(np.asarray(logp(state, b)) - batch["old_logp"]) * mask
        row["mismatch_replay" if replay else "mismatch_own_routing"] = float(diff.sum() / mask.sum())
        row[("max_replay" if replay else "max_own_routing")] = float(diff.max())
    print(json.dumps(row), flush=True)
pool.close()
