"""Per-host input: global batches from host-local rows, and data-iterator checkpoints that
restore on a different number of hosts.

Each host reads its own slice of every global batch (`katjax.data.batch_dataset` takes
every process_count-th row); `global_batch` assembles the slices into one global
`jax.Array` per field. The iterator state orbax saves with a checkpoint is one file per
host (`process_{i}-of-{n}.json`, as grain's own handler writes). grain's handler only
reads back the file of the same host count; `HostDataSave` / `HostDataRestore` also
restore a checkpoint written by N hosts on M: the hosts step in lockstep, so their states
are equal (a batch index) and that state means the same global position on any host count.
Unequal states (a pipeline whose state is per-host) are an error naming the files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def global_batch(local_batch: dict, sharding) -> dict:
  """{name: host-local rows [B_host, ...]} -> {name: global jax.Array [B, ...]} on `sharding`.

  Process p's rows land on its own devices; the global batch is the hosts' rows in process
  order (one process: the identity).
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


class HostDataHandler(ocp.CheckpointHandler):
  """Orbax handler for grain iterators that also restores across host counts."""

  def save(self, directory: epath.Path, args: "HostDataSave"):
    i, n = jax.process_index(), jax.process_count()
    (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(args.item.get_state()))

  def restore(self, directory: epath.Path, args: "HostDataRestore"):
    i, n = jax.process_index(), jax.process_count()
    own = directory / f"process_{i}-of-{n}.json"
    if own.exists():
      state = json.loads(own.read_text())
    else:
      state = _common_state(directory)
    args.item.set_state(state)
    args.item.start_prefetch()
    return args.item

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(HostDataHandler, for_save=True)
@dataclasses.dataclass
class HostDataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(HostDataHandler, for_restore=True)
@dataclasses.dataclass
class HostDataRestore(ocp.args.CheckpointArgs):
  item: Any


def _common_state(directory: epath.Path):
  files = sorted(p for p in directory.iterdir()
                 if re.fullmatch(r"process_\d+-of-\d+\.json", p.name))
  if not files:
    raise ValueError(f"no data-iterator state (process_*-of-*.json) in {directory}")
  states = {p.name: json.loads(p.read_text()) for p in files}
  distinct = {json.dumps(s, sort_keys=True) for s in states.values()}
  if len(distinct) > 1:
    raise ValueError(
        f"cannot restore the data iterator on {jax.process_count()} hosts: the checkpoint's "
        f"per-host states differ ({states}) in {directory}; restore on the host count that "
        f"wrote it")
  return next(iter(states.values()))
