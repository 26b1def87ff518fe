"""Checkpoints: orbax CheckpointManager holding the train state and the data iterator's state together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed at any moment
(SIGKILL included) leaves only whole checkpoints behind. A checkpoint that cannot be read is reported by path and
skipped in favour of the previous one; nothing is ever deleted by a failed restore.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def _HANDLERS() -> dict:
    """The two items of every checkpoint: the train state (arrays) and the data iterator's state (JSON)."""
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_HANDLERS())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """Restores the newest readable checkpoint onto ``abstract_state``'s shapes and shardings.

        Returns (step, state, data_state), or None when there is no checkpoint at all. Raises CheckpointError
        when checkpoints exist but none can be read (the files are left untouched for inspection).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        failures = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                state = restored["state"]
                jax.block_until_ready(state)
                return step, state, dict(restored["data"] or {})
            except Exception as e:  # orbax raises many types for unreadable files
                path = os.path.join(self.directory, str(step))
                msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:300]})"
                log.error("%s; falling back to an earlier checkpoint", msg)
                failures.append(msg)
        raise CheckpointError("no readable checkpoint in " + self.directory + ":\n  " + "\n  ".join(failures)
                              + "\nMove the broken step directories away (or use a new --workdir) to start over.")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any, Any]:
    """(step, params, model_state) of a workdir's newest readable checkpoint (or ``step``), for inference.

    Restored without a target, as host arrays: no model code or sharding is needed to read them.
    """
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory}); train first")
    manager = ocp.CheckpointManager(directory, item_handlers=_HANDLERS())
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint")
    errors = []
    for s in steps:
        try:
            # Restore onto one local device, whatever topology the checkpoint was written from.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            meta = manager.item_metadata(s)["state"]
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
            restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = restored["state"]
            return s, state["params"], state.get("model_state", {}) or {}
        except Exception as e:
            errors.append(f"{directory}/{s}: {type(e).__name__}: {str(e)[:200]}")
            log.error("checkpoint %s/%s is unreadable, trying an earlier one", directory, s)
    raise CheckpointError("no readable checkpoint:\n  " + "\n  ".join(errors))
