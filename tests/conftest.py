import os

# Eight virtual CPU devices, so sharding tests can build real meshes (set before jax loads).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Parity tests compare float32 against transformers at 1e-4: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
