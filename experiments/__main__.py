"""python -m experiments <command> [flags]

Commands:
  pretrain  --config=configs/pretrain_tiny.py [--config.steps=... --config.workdir=...]
  demo      pre-train the tiny model on the local Python stdlib (CPU, minutes), then sample
  convert   --checkpoint=DIR: load a Hugging Face GLM-4.5 checkpoint, print its config and size
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import commands

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (convert)")
flags.DEFINE_integer("steps", 64, "tokens to sample (demo)")
flags.DEFINE_string("prompt", "def ", "text to continue (demo)")
flags.DEFINE_string("workdir", None, "workdir of the demo run (default: the config's)")
flags.DEFINE_float("temperature", 0.7, "sampling temperature, 0 = greedy (demo)")
flags.DEFINE_integer("seed", 0, "sampling seed (demo)")


def main(argv):
    if not flags.FLAGS["verbosity"].present:  # library INFO chatter off unless asked for
        logging.set_verbosity(logging.WARNING)
    if len(argv) != 2 or argv[1] not in commands.COMMANDS:
        raise app.UsageError(__doc__)
    commands.COMMANDS[argv[1]](flags.FLAGS)


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
