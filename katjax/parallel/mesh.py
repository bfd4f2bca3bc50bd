"""Device meshes and sharding by logical axis names.

`make_mesh(data, fsdp, tensor, sequence)` lays the available devices out on the mesh axes;
`logical_sharding` turns a tuple of logical names plus a shape into a `NamedSharding`,
dropping any mesh axis that does not divide its dimension (replication instead of an error),
and never using one mesh axis twice in an array.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from katjax.parallel.rules import DEFAULT_RULES, MESH_AXES, mesh_axes_for


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, sequence: int = 1,
              devices=None) -> Mesh:
  """Mesh with axes `MESH_AXES` ("data", "fsdp", "sequence", "tensor") over all `devices`
  (default: every device of every process); one size may be -1 (= the remaining devices).

  sequence > 1 splits each tree row's tokens over that many devices (context parallelism,
  `katjax.model.ring_attention`); the default 1 leaves every array whole along its length.
  """
  devices = list(jax.devices() if devices is None else devices)
  by_name = {"data": data, "fsdp": fsdp, "sequence": sequence, "tensor": tensor}
  sizes = [by_name[a] for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"make_mesh: axis sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices, "
                     f"only {len(devices)} available")
  if total != len(devices):
    # A mesh over part of the devices would leave chips idle (and, multi-host, whole hosts
    # out of every collective): ask for the split explicitly.
    fit = "does not divide" if len(devices) % total else "uses only part of"
    raise ValueError(f"make_mesh: mesh {dict(zip(MESH_AXES, sizes))} of {total} devices "
                     f"{fit} the {len(devices)} devices; make the sizes multiply to "
                     f"{len(devices)} (one may be -1) or pass devices=")
  try:
    grid = jax.experimental.mesh_utils.create_device_mesh(sizes, devices[:total])
  except Exception:  # noqa: BLE001 - fake CPU devices have no topology; plain order is fine
    grid = np.asarray(devices[:total]).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def logical_spec(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array with logical `axes` and `shape` on `mesh`."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {shape}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    chosen = []
    for axis in mesh_axes_for(name, rules):
      size = mesh.shape[axis]
      if size == 1 or axis in used:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
        chosen.append(axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def logical_sharding(axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(axes, shape, mesh, rules))


def param_shardings(axes, shapes, mesh: Mesh, rules=DEFAULT_RULES):
  """Pytree of NamedSharding from logical axes (`katjax.model.logical_axes(cfg)`) and shapes.

  `shapes` is any pytree with the same structure whose leaves have `.shape` (the params
  themselves, or `katjax.model.param_shapes(cfg)` to plan before allocating).
  """
  return jax.tree.map(lambda a, s: logical_sharding(a, s.shape, mesh, rules), axes, shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params, axes, mesh: Mesh, rules=DEFAULT_RULES):
  """Place params on the mesh by their logical axes (`katjax.model.logical_axes(cfg)`)."""
  return jax.device_put(params, param_shardings(axes, params, mesh, rules))


def opt_state_shardings(optimizer, opt_state, params_shardings, mesh: Mesh):
  """Shardings for an optax state: each params-shaped part (Adam's mu, nu) sharded like the
  params, everything else (counts, injected hyperparameters) replicated.

  jit does not propagate the params' shardings into `optimizer.init` (its zeros do not
  depend on the params' values), so without these the moments come out replicated.
  `opt_state` may be abstract (`jax.eval_shape(optimizer.init, params)`).
  """
  import optax  # optimizers are a train-time dependency
  return optax.tree_map_params(optimizer, lambda _, sh: sh, opt_state, params_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def train_state_shardings(optimizer, abstract_state, params_shardings, mesh: Mesh):
  """Shardings for a train state (fields `params`, `opt_state`, the rest replicated), to give
  `jax.jit(TrainState.create, out_shardings=...)`. abstract_state: `jax.eval_shape` of it."""
  rep = replicated(mesh)
  return jax.tree.map(lambda _: rep, abstract_state).replace(
      params=params_shardings,
      opt_state=opt_state_shardings(optimizer, abstract_state.opt_state, params_shardings, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES, *,
                   length: bool = False) -> NamedSharding:
  """Sharding for a batch array [B, T, ...]: batch over data*fsdp, the rest replicated.

  length=True: T too, over the "length" rule's axes (`sequence`), as the RL tree step takes
  its rows; T must then be a multiple of the sequence axis size.
  """
  def spec(logical):
    axes = tuple(a for a in mesh_axes_for(logical, rules) if mesh.shape[a] > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes

  rest = [None] * (ndim - 1)
  if length and ndim >= 2:
    rest[0] = spec("length")
  return NamedSharding(mesh, PartitionSpec(spec("batch"), *rest))


def shard_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Place every array of a batch pytree with its leading axis over the batch mesh axes."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules)),
                      batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
