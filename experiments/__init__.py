"""`python -m experiments <command>`: the launcher for glm-jax runs."""
