"""Checkpoints: one orbax CheckpointManager holding train state, data iterator and config.

Each step directory holds `state` (the TrainState pytree: step, params, optimizer, rng),
`data` (the grain iterator state of each host; restorable on another host count, see
`katjax.parallel.host_data`) and `config` (JSON). orbax writes to a
temporary directory and renames it when complete, so a run killed mid-save (even by SIGKILL
during an async save) resumes from the last complete step. Keeps the newest `keep`.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from katjax.parallel.host_data import HostDataRestore, HostDataSave


class Checkpointer:
  """save(step, state, data_iter, config) / restore(abstract_state, data_iter)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, state, data_iter, config: dict, *, force: bool = False) -> bool:
    """Start saving (async: returns once device arrays are copied); True if a save began."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=HostDataSave(data_iter),
                              config=ocp.args.JsonSave(_jsonable(config)))
    return self._mgr.save(step, args=args, force=force)

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """-> (state, config dict) restored at `step` (default latest); data_iter set in place.

    `abstract_state`: a pytree of arrays or jax.ShapeDtypeStruct with the target shardings
    (e.g. the freshly initialised state), so restored arrays land sharded on the mesh.
    """
    step = self._mgr.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=HostDataRestore(data_iter),
        config=ocp.args.JsonRestore()))
    return out.state, out.config

  def wait(self):
    """Block until any async save has finished."""
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


def _jsonable(config) -> dict:
  if hasattr(config, "to_json"):
    return json.loads(config.to_json())
  return json.loads(json.dumps(config, default=str))
