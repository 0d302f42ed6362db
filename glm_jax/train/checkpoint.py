"""Orbax checkpoints of the whole training state plus the data iterator position.

The train state (params, balance biases, optimizer state, step, spike-guard average) is saved
as a flat {path: array} dict, so the on-disk layout does not depend on how nnx/optax pytree
nodes flatten, and restores straight into the live state's shardings. The Grain iterator state
is saved beside it as JSON, so a restarted run reads exactly the batches it would have read.
Orbax writes each step into a temporary directory and renames it when complete: a run killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def flatten_state(tree) -> dict[str, jax.Array]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def unflatten_like(tree, flat: dict[str, Any]):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    missing = [jax.tree_util.keystr(p) for p, _ in leaves if jax.tree_util.keystr(p) not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} state entries, e.g. {missing[:3]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in leaves])


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`, saving asynchronously."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict | None) -> None:
        args = {"state": ocp.args.StandardSave(flatten_state(state))}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, state_like, *, with_data: bool = True):
        """-> (state shaped and sharded like `state_like`, data iterator state or None)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flatten_state(state_like))
        args = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return unflatten_like(state_like, restored["state"]), restored.get("data") if with_data else None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
