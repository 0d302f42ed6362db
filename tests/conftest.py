import os
import tempfile

# Eight virtual CPU devices, so sharding tests can build real meshes (set before jax loads).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# Many tests compile the same small programs (the tiny model's train, GRPO and decode steps,
# in this process and in the CLI / multi-process subprocesses): a persistent compilation cache
# shared by the xdist workers and their subprocesses compiles each once. Keyed by the program,
# the jax version and the flags, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"glm_jax_test_jit_cache_{os.getuid()}"))

import jax  # noqa: E402

# Parity tests compare float32 against transformers at 1e-4: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
