"""Orbax checkpoints under `<workdir>/checkpoints/<step>/`: async, keep-N, restore onto any mesh.

The saved tree is the train state plus a small JSON record (step, config). Restoring takes an
abstract state whose leaves carry the *target* shardings, so a checkpoint written on one mesh
loads onto another. The data pipeline is random access by step, so the step is all the data
state there is to save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for the train state and its metadata."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Start saving (returns at once when async); False if this step is already saved."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
        """Restore `step` into the shapes, dtypes and shardings of `like_state`."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        """Block until every pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
