"""One process of a multi-process CPU training run (tests/test_distributed.py starts it).

usage: distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS
Trains the tiny model for a few steps on a data=2 x expert=2 mesh over all processes' devices,
each process feeding only its own rows of a fixed global batch, and prints the losses as JSON.
"""

import json
import os
import sys

process_id, num_processes, port, local_devices = map(int, sys.argv[1:5])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"

from glm_jax import distributed  # noqa: E402

if num_processes > 1:
    distributed.initialize(f"localhost:{port}", num_processes, process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from glm_jax import GlmMoeModel, ModelConfig, sharding  # noqa: E402
from glm_jax.optim import muon  # noqa: E402
from glm_jax.train.loop import global_batch  # noqa: E402
from glm_jax.train.step import StepConfig, TrainState, make_train_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
config = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)  # less to compile
mesh = sharding.make_mesh({"expert": 2})  # data = devices / 2
model = sharding.create_sharded(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)), mesh)
optimizer = muon(1e-2)
graphdef, state = TrainState.create(model, optimizer)
train_step = make_train_step(graphdef, optimizer, StepConfig(mtp_weight=0.0), 1e-2)

global_rows, seq = 8, 16
rows = slice(process_id * global_rows // num_processes, (process_id + 1) * global_rows // num_processes)
losses = []
for step in range(3):
    ids = np.random.default_rng(step).integers(0, 64, (global_rows, seq + 1)).astype(np.int32)
    batch = dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:],
                 segment_ids=np.ones((global_rows, seq), np.int32),
                 positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (global_rows, seq)),
                 loss_mask=np.ones((global_rows, seq), np.float32))
    local = {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, global_batch(local, 1, mesh))
    losses.append(float(metrics["loss"]))
print(json.dumps({"process": process_id, "devices": jax.device_count(), "losses": losses}))
