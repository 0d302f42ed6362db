import jax

# Parity tests compare float32 against transformers at 1e-4: no reduced-precision matmul passes.
jax.config.update("jax_default_matmul_precision", "highest")
