"""python -m experiments <command> [flags]

Commands:
  pretrain  --config=configs/pretrain_tiny.py [--config.steps=... --config.workdir=...]
  demo      pre-train the tiny model on the local Python stdlib (CPU, minutes), then sample
  generate  --checkpoint=DIR --prompt="...": stream a continuation (HF dir or pretrain workdir)
  chat      --checkpoint=DIR [--nothinking] [--tools=tools.json]: chat on stdin, GLM-4.5 format
  bench     --what=decode [--preset=glm45_mini] | --what=kernels: JSON lines, peers in the same run
  plan      --config=... --devices=N --mesh='{"fsdp": 16, "expert": 8}': per-device memory
  convert   --checkpoint=DIR: load a Hugging Face GLM-4.5 checkpoint, print its config and size

Several processes (multi-host): pass --coordinator_address/--num_processes/--process_id, or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID; TPU pods and SLURM are detected.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import commands
from glm_jax import distributed

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index")
flags.DEFINE_string("checkpoint", None,
                    "Hugging Face directory, or a pre-training workdir (generate, chat, convert)")
flags.DEFINE_integer("steps", 64, "tokens to sample (demo, generate, chat)")
flags.DEFINE_string("prompt", "def ", "text to continue (demo, generate)")
flags.DEFINE_string("workdir", None, "workdir of the demo run (default: the config's)")
flags.DEFINE_string("what", "decode", "bench: which benchmark")
flags.DEFINE_string("preset", "glm45_mini", "bench: model preset")
flags.DEFINE_integer("devices", 8, "virtual CPU devices (plan)")
flags.DEFINE_string("mesh", "{}", "mesh axis sizes as JSON (plan)")
flags.DEFINE_integer("rows_per_device", 1, "sequences per device per micro-batch (plan)")
flags.DEFINE_float("temperature", 0.7, "sampling temperature, 0 = greedy")
flags.DEFINE_integer("top_k", 0, "sample among the k likeliest tokens (0 = off)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
flags.DEFINE_bool("thinking", True, "chat: hybrid thinking on (off appends /nothink)")
flags.DEFINE_string("tools", None, "chat: JSON file with a list of tool definitions")
flags.DEFINE_integer("seed", 0, "sampling seed")


def main(argv):
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter off unless asked for
        logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or argv[1] not in commands.COMMANDS:
        raise app.UsageError(__doc__)
    distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                           flags.FLAGS.process_id)
    commands.COMMANDS[argv[1]](flags.FLAGS)


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
