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
from absl import logging

from glm_jax.errors import CheckpointError


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
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
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
        flat = flatten_state(state_like)
        self._check_layout(step, flat, exact=True)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat)
        args = {"state": ocp.args.StandardRestore(abstract)}
        if with_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return unflatten_like(state_like, restored["state"]), restored.get("data") if with_data else None

    def restore_latest(self, restore):
        """-> (step, restore(step)) for the newest checkpoint that restores, or None when there
        is none. A newest checkpoint that fails (a killed write, a missing or truncated file) is
        moved aside to `STEP.corrupt` with a one-line warning, and the previous one is tried."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, restore(step)
            except CheckpointError:  # readable, but another run's layout: the user must decide
                raise
            except Exception as e:  # orbax raises many kinds; the root cause is what matters
                logging.warning("checkpoint %s unreadable (%s); falling back to the previous one",
                                self.directory / str(step), _root_cause(e))
                self._set_aside(step)
        return None

    def restore_weights(self, step: int, weights_like):
        """Restores only the entries of `weights_like` (e.g. a TrainState whose opt_state is
        None: params and balance biases), leaving the optimizer state on disk unread."""
        flat = flatten_state(weights_like)
        self._check_layout(step, flat, exact=False)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, flat)
        manager = ocp.CheckpointManager(self.directory)  # no handler bound yet: partial restore
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True)))
        finally:
            manager.close()
        return unflatten_like(weights_like, restored["state"])

    def _check_layout(self, step: int, flat: dict, *, exact: bool) -> None:
        """Raises CheckpointError when checkpoint `step` holds a different set of state entries
        than `flat` wants (every one of them, and no other when `exact`): a run of another
        configuration or version wrote it. Not a damaged file, so `restore_latest` neither sets
        it aside nor falls back to an older one."""
        metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
        saved = set(metadata.item_metadata.keys())
        missing = sorted(set(flat) - saved)
        extra = sorted(saved - set(flat)) if exact else []
        if missing or extra:
            found = [f"{len(names)} entries {what} (e.g. {', '.join(names[:2])})"
                     for names, what in ((missing, "this run needs are absent"),
                                         (extra, "it holds are unknown to this run")) if names]
            raise CheckpointError(
                f"{self.directory / str(step)} was written for another training state (another "
                f"optimizer, model or version): {'; '.join(found)}. Resume it with the "
                "configuration and version that wrote it, or start a new workdir (`init` can "
                "load its weights).")

    def _set_aside(self, step: int) -> None:
        path = self.directory / str(step)
        if path.exists():
            path.rename(path.with_name(f"{step}.corrupt"))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, as one line."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
