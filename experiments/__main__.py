"""python -m experiments <command> [flags]; `python -m experiments` lists the commands and
`python -m experiments <command> --help` shows one command's flags and its config's fields.

Several processes (multi-host): pass --coordinator_address/--num_processes/--process_id, or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID; TPU pods and SLURM are detected.

A mistake in what the user gave (an unknown command or flag, a config field that does not exist
or holds a bad value, a checkpoint or data file that does not parse) prints one line naming it
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import commands
from glm_jax import distributed
from glm_jax.data import tasks
from glm_jax.errors import InputError

config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index")
flags.DEFINE_string("checkpoint", None,
                    "Hugging Face directory, or a training workdir (generate, chat, convert, eval)")
flags.DEFINE_integer("steps", 64, "tokens to sample (demo, generate, chat, eval, distill)")
flags.DEFINE_string("prompt", "def", "text to continue (demo, generate)")
flags.DEFINE_string("workdir", None, "workdir of the demo run (default: the config's)")
flags.DEFINE_string("what", "decode", "bench: which benchmark")
flags.DEFINE_string("preset", "glm45_mini", "bench: model preset")
flags.DEFINE_integer("devices", 8, "virtual CPU devices (plan)")
flags.DEFINE_string("topology", None, "plan: compile for this TPU topology through libtpu instead "
                    "of virtual CPUs, e.g. v5p:4x4x8 (128 chips)")
flags.DEFINE_float("hbm_gib", None, "plan --topology: compile as if each chip had this much HBM "
                   "(the compiler then schedules to fit it, or says what it needs)")
flags.DEFINE_string("mesh", "{}", "mesh axis sizes as JSON (plan)")
flags.DEFINE_integer("rows_per_device", 1, "sequences per device per micro-batch (plan)")
flags.DEFINE_integer("micro_batches", 1, "plan: micro-batches per step; above 1 the step "
                     "accumulates gradients (the memory is the same for any count above 1)")
flags.DEFINE_float("temperature", 0.7, "sampling temperature, 0 = greedy")
flags.DEFINE_integer("top_k", 0, "sample among the k likeliest tokens (0 = off)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
flags.DEFINE_bool("thinking", True, "chat: hybrid thinking on (off appends /nothink)")
flags.DEFINE_string("tools", None, "chat: JSON file with a list of tool definitions")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_string("task", "builtin", "eval, distill: 'builtin' (the task family) or a JSONL of "
                    "prompts with references")
flags.DEFINE_string("split", "heldout", "eval, distill: the built-in task's split")
flags.DEFINE_string("kinds", ",".join(tasks.KINDS), "eval, distill: the built-in task's kinds "
                    "(comma-separated; the mix a policy was trained on, e.g. add,sort,calculator)")
flags.DEFINE_integer("problems", 64, "eval, distill: number of prompts")
flags.DEFINE_integer("samples", 1, "eval, distill: responses sampled per prompt")
flags.DEFINE_string("k", "1", "eval: pass@k for each k (comma-separated, <= --samples)")
flags.DEFINE_string("modes", "think,nothink", "eval: thinking modes to score")
flags.DEFINE_string("text", None, "eval: held-out text for bits per byte (file, or .jsonl of text)")
flags.DEFINE_integer("batch_size", 64, "eval, distill: sequences per generation batch")
flags.DEFINE_integer("reward_workers", 2, "eval, distill: reward processes (0 = in process)")
flags.DEFINE_string("teachers", None, "distill: comma-separated teacher checkpoints")
flags.DEFINE_string("out", None, "distill: the SFT JSONL to write")

EXIT_USAGE = 2


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _parse(argv: list[str]) -> list[str]:
    """absl + ml_collections parsing with every user mistake as one line."""
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS.config is not None:  # a config file loads lazily: fail here, not mid-run
            flags.FLAGS.config.keys()
    except flags.Error as e:
        if "Traceback" in str(e):  # the config file's get_config raised: its message only
            _fail(f"--config: {_last_line(e).split(': ', 1)[-1]}")
        _fail(str(e))
    except AttributeError as e:  # ml_collections: an override naming no config field
        field = str(e).strip("\"' ")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        name = next((g for g in given if field in g.split(".")), f"--config...{field}")
        _fail(f"flag {name}: the config has no field {field!r}")
    except Exception as e:  # the config file is missing or raises while loading
        _fail(f"--config: {_last_line(e)}")
    return rest


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("--help", "-h", "--helpfull"):
        print(commands.usage())
        return
    name = argv[1]
    if name not in commands.COMMANDS:
        _fail(f"unknown command {name!r} (the command comes first); the commands are: "
              f"{', '.join(commands.COMMANDS)}")
    if any(a in ("--help", "-h") for a in argv[2:]):
        _parse([argv[0]] + [a for a in argv[2:] if a not in ("--help", "-h")])
        print(commands.command_help(name, flags.FLAGS))
        return
    rest = _parse([argv[0]] + argv[2:])
    if len(rest) > 1:
        _fail(f"{name}: unexpected arguments {rest[1:]} (flags are --name=value)")

    def run(_):
        if not flags.FLAGS["verbosity"].present:  # library INFO chatter off unless asked for
            logging.set_verbosity(logging.WARNING)
        try:
            distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                   flags.FLAGS.process_id)
            commands.COMMANDS[name].run(flags.FLAGS)
        except (InputError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
            _fail(str(e).splitlines()[0] if isinstance(e, OSError) else str(e))

    app.run(run, argv=[argv[0]], flags_parser=lambda _: [argv[0]])


if __name__ == "__main__":
    main()
