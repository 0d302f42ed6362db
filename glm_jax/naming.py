"""How code outside the model recognises parameters: by the names on their state path."""

MATRIX_NAMES = ("kernel", "gate_proj", "up_proj", "down_proj")  # Linear kernels, stacked experts


def path_names(path) -> tuple[str, ...]:
    """A jax key path (from tree_map_with_path over an nnx.State) -> its names as strings."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
