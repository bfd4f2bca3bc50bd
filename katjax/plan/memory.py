"""Ahead-of-time memory plan: compile a step for a mesh without allocating a single weight.

The RL tree step (`katjax.train.tree_step`) and the sampler's decode step
(`katjax.model.forward_with_cache`) are lowered with `jax.ShapeDtypeStruct` inputs that
carry their mesh shardings, compiled for the mesh (fake CPU devices are enough: the SPMD
partitioner emits the per-device program), and the compiled executable's memory analysis
gives the per-device bytes: arguments (params, optimizer state, batch), outputs, aliased
(donated) buffers and temporaries (activations, gradients, logits). Nothing runs.

A device holds `arguments + outputs - aliased + temporaries` at the peak. Temporaries grow
linearly with the tree row length (remat keeps one residual per layer; blockwise attention
and the loss are linear in tokens), so two compiles give the largest row that fits a budget.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from katjax import model as kmodel
from katjax.core.losses import PolicyLossConfig
from katjax.core.tree_pack import DEVICE_KEYS
from katjax.parallel import (batch_sharding, logical_sharding, param_shardings, replicated,
                             train_state_shardings)
from katjax.train.state import TrainState, make_optimizer
from katjax.train.tree_step import make_tree_step

GIB = 1 << 30
_FLOAT_KEYS = ("pos_weight", "neg_weight", "kl_weight", "count", "pos_count", "neg_count",
               "rollout_logp", "denom")


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of one compiled step."""

  params: int  # the weights' shards
  optimizer: int  # optimizer state shards (0 for decode)
  arguments: int  # every input buffer (params, optimizer, batch or cache)
  outputs: int
  aliased: int  # outputs written into donated inputs
  temporaries: int  # activations, gradients, logits, collectives' buffers

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries


def tree_step_memory(cfg, mesh, rows: int, row_tokens: int, *, optimizer=None,
                     loss_cfg: PolicyLossConfig | None = None, micro_batches: int = 1) -> Memory:
  """Compile the RL tree step for `rows` x `row_tokens` on `mesh`; per-device Memory."""
  optimizer = optimizer or make_optimizer()
  loss_cfg = loss_cfg or PolicyLossConfig()
  state, state_sh = abstract_train_state(cfg, mesh, optimizer)
  batch_sh = batch_sharding(mesh, 2, length=True)
  batch = {k: jax.ShapeDtypeStruct((rows, row_tokens),
                                   jnp.float32 if k in _FLOAT_KEYS else jnp.int32,
                                   sharding=batch_sh) for k in DEVICE_KEYS}
  step = make_tree_step(cfg, loss_cfg, optimizer, state_shardings=state_sh,
                        batch_sharding=batch_sh, out_sharding=replicated(mesh),
                        micro_batches=micro_batches)
  compiled = step.lower(state, batch).compile()
  return _memory(compiled, shard_bytes(state.params), shard_bytes(state.opt_state))


def decode_memory(cfg, mesh, batch: int, cache_len: int, cache_dtype=None) -> Memory:
  """Compile one decode step (a token for each of `batch` rows, KV cache of `cache_len`)."""
  params = abstract_params(cfg, mesh)
  dtype = jnp.dtype(cache_dtype or cfg.compute_dtype)
  shape = (batch, cfg.n_kv_heads, cache_len, cfg.dim_per_head)
  sh = logical_sharding(("batch", "kv_heads", "length", "head_dim"), shape, mesh)
  cache = tuple({"k": jax.ShapeDtypeStruct(shape, dtype, sharding=sh),
                 "v": jax.ShapeDtypeStruct(shape, dtype, sharding=sh)}
                for _ in range(cfg.n_layers))
  rows = batch_sharding(mesh, 1)
  tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=batch_sharding(mesh, 2))
  index = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
  step = jax.jit(functools.partial(kmodel.forward_with_cache, cfg), donate_argnums=(3,))
  compiled = step.lower(params, tok, tok, cache, index).compile()
  return _memory(compiled, shard_bytes(params), 0)


def largest_row(sizes_and_peaks, budget: int, multiple: int = 1024) -> int:
  """Largest row length (a multiple of `multiple`) whose linear-fit peak fits `budget`.

  sizes_and_peaks: [(row_tokens, peak bytes)] from at least two compiles. 0 if none fits.
  """
  (s1, p1), (s2, p2) = sorted(sizes_and_peaks)[:1] + sorted(sizes_and_peaks)[-1:]
  slope = (p2 - p1) / (s2 - s1)
  if slope <= 0:
    raise ValueError(f"peak memory does not grow with the row: {sizes_and_peaks}")
  fits = s1 + (budget - p1) / slope
  return max(0, int(fits // multiple) * multiple)


def abstract_params(cfg, mesh):
  """ShapeDtypeStruct params with their mesh shardings (no memory allocated)."""
  shapes = kmodel.param_shapes(cfg)
  shardings = param_shardings(kmodel.logical_axes(cfg), shapes, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def abstract_train_state(cfg, mesh, optimizer):
  """(TrainState of sharded ShapeDtypeStructs, its shardings): Adam's moments sharded like
  the params, step and rng replicated (`katjax.parallel.train_state_shardings`)."""
  params = abstract_params(cfg, mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  shapes = jax.eval_shape(lambda p, k: TrainState.create(p, optimizer, k), params, key)
  shardings = train_state_shardings(optimizer, shapes,
                                    jax.tree.map(lambda x: x.sharding, params), mesh)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, shardings)
  return state, shardings


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs / arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def _memory(compiled, params: int, optimizer: int) -> Memory:
  m = compiled.memory_analysis()
  return Memory(params=params, optimizer=optimizer, arguments=int(m.argument_size_in_bytes),
                outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                temporaries=int(m.temp_size_in_bytes))
