"""python -m experiments <command> [flags]

Commands:
  demo      build the `tiny` model, run a forward pass and greedily decode a few tokens
  convert   check a Hugging Face GLM-4.5 checkpoint: load it, print its config and size
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import commands

flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint directory (convert)")
flags.DEFINE_integer("steps", 8, "tokens to decode greedily (demo)")
flags.DEFINE_integer("seed", 0, "random seed (demo)")


def main(argv):
    if len(argv) != 2 or argv[1] not in commands.COMMANDS:
        raise app.UsageError(__doc__)
    commands.COMMANDS[argv[1]](flags.FLAGS)


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
