"""Orbax checkpoints of a run: the train state, the data iterator's position and the config.

One `CheckpointManager` directory per run (`<workdir>/checkpoints/<step>/`), each step holding
`state` (params, optimizer state, step: restored straight into the shardings of an abstract
target), `data` (the grain iterator state, JSON) and `config` (JSON, for humans and for checking
that a resumed run is the same run). `save_params` / `restore_params` keep one params pytree on
its own, e.g. the initial policy pi_0 of the reference KL when it was made by a warm-up.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores (train_state, data_state, config) by step; keeps the last few."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, train_state: Any, data_state: dict, config: dict) -> None:
        """Starts an asynchronous save of `step`; `wait()` or the next save finishes it."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
        )

    def restore(self, step: int, abstract_train_state: Any) -> tuple[Any, dict, dict]:
        """(train_state, data_state, config) of `step`; arrays take the target's shardings."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_train_state),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data, restored.config

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params of `step`'s train state, into the shapes and shardings of
        `abstract_params` (the optimizer state is neither read nor allocated)."""
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(os.path.join(self.manager.directory, str(step), "state"), args=args)["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Writes one params pytree to `path` (synchronously)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), params, force=True)


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Reads params saved by `save_params` into the shapes and shardings of `abstract_params`."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path), abstract_params)
