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

`fit_tree_step` is the same check at the start of a real RL run: it compiles the run's own
tree step (the executable the run then uses, so nothing compiles twice) and stops the run,
naming `rl.row_tokens` and the largest row that fits, when the step would not fit the
device's memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from katjax import model as kmodel
from katjax.core.fields import FIELD
from katjax.core.losses import PolicyLossConfig
from katjax.core.tree_pack import DEVICE_KEYS, WEIGHT_KEYS
from katjax.parallel import (batch_sharding, logical_sharding, param_shardings, replicated,
                             train_state_shardings)
from katjax.train.state import TrainState, make_optimizer
from katjax.train.tree_step import make_tree_step

GIB = 1 << 30


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
  batch = abstract_tree_batch(rows, row_tokens, batch_sh)
  step = make_tree_step(cfg, loss_cfg, optimizer, state_shardings=state_sh,
                        batch_sharding=batch_sh, out_sharding=replicated(mesh),
                        micro_batches=micro_batches)
  compiled = step.lower(state, batch).compile()
  return _memory(compiled, shard_bytes(state.params), shard_bytes(state.opt_state))


def fit_tree_step(step, state, cfg, *, rows: int, row_tokens: int, sharding, budget: int,
                  source: str = "the device's memory", extra=(), compiles: int = 6):
  """Compile the tree step `step(state, batch)` for `rows` x `row_tokens` -> the executable.

  When the compiled step's per-device peak exceeds `budget` bytes: ValueError naming
  rl.row_tokens and the largest row that fits, found by at most `compiles` more compiles
  (`largest_fitting_row`: every reported row was compiled and fits). `source` says where the
  budget came from; extra: names of float32 [rows, row_tokens] arrays the caller adds to the
  batch (`old_logp` in the asynchronous learner).
  """
  batch = functools.partial(abstract_tree_batch, rows, sharding=sharding, extra=extra)
  peak_of = lambda tokens: _memory(step.lower(state, batch(tokens)).compile(), 0, 0).peak  # noqa: E731
  compiled = step.lower(state, batch(row_tokens)).compile()
  peak = _memory(compiled, 0, 0).peak
  if peak <= budget:
    return compiled
  n = sharding.mesh.shape.get("sequence", 1)
  multiple = row_multiple(cfg, n, row_tokens // 2)
  # "auto" attention is dense (quadratic memory) up to dense_max_len and blockwise above, so
  # memory is not monotonic across that length: search the blockwise rows only.
  floor = (cfg.dense_max_len if cfg.attention_impl == "auto" and row_tokens > cfg.dense_max_len
           else 0)
  largest = largest_fitting_row(peak_of, row_tokens, peak, budget, multiple, floor=floor,
                                compiles=compiles)
  fits = (f"the largest row that fits is {largest} tokens" if largest else
          f"no row of {floor + multiple} to {row_tokens} tokens fits")
  mesh = dict(sharding.mesh.shape)
  raise ValueError(
      f"rl.row_tokens={row_tokens} does not fit: the tree step ({rows} rows) peaks at "
      f"{peak / GIB:.3f} GiB per device on mesh {mesh} (XLA's memory analysis), over the "
      f"{budget / GIB:.3f} GiB of {source}; {fits} (or split rows over more sequence "
      f"devices, shard the weights over more fsdp / tensor devices, or hold fewer rl.num_rows "
      f"per data x fsdp device)")


def largest_fitting_row(peak_of, row: int, peak: int, budget: int, multiple: int, *,
                        floor: int = 0, compiles: int = 6) -> int:
  """Largest multiple of `multiple` in (floor, row) whose `peak_of(tokens)` fits `budget`.

  `row` (peak `peak`) does not fit. Each probe is a compile, so the search keeps a bracket
  (a row that fits, a row that does not) and probes where the straight line between them
  meets the budget (the middle while no row is known to fit), at most `compiles` times.
  Memory must grow with the row. Returns a probed row that fits (the largest probed), or 0
  when none did.
  """
  lo, hi = (floor, None), (row, peak)  # (tokens, peak): lo fits (peak None: not probed)
  for _ in range(compiles):
    if hi[0] - lo[0] <= multiple:
      break
    if lo[1] is None or hi[1] <= lo[1]:
      guess = (lo[0] + hi[0]) / 2
    else:
      guess = lo[0] + (budget - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
    tokens = min(max(int(guess // multiple) * multiple, lo[0] + multiple), hi[0] - multiple)
    p = peak_of(tokens)
    if p <= budget:
      lo = (tokens, p)
    else:
      hi = (tokens, p)
  return lo[0] if lo[1] is not None else 0


def device_memory_budget(devices, gib: float = 0.0) -> tuple[int | None, str]:
  """(bytes per device a step may use, where that figure comes from) for `fit_tree_step`.

  gib > 0 (config `train.memory_budget_gib`) wins; else the smallest `bytes_limit` the
  devices report (`Device.memory_stats()`, GPUs and TPUs); else (None, ...): unknown (CPU),
  no check.
  """
  if gib > 0:
    return int(gib * GIB), "train.memory_budget_gib"
  limits, local = [], [d for d in devices if d.process_index == jax.process_index()]
  for d in local:  # another host's devices cannot be queried from here
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the query (CPU) raise or return None
      stats = None
    if stats and stats.get("bytes_limit"):
      limits.append(int(stats["bytes_limit"]))
  if not limits:
    return None, "no device memory limit known"
  return min(limits), f"the device's memory ({local[0].device_kind} bytes_limit)"


def row_multiple(cfg, sequence: int, half: int) -> int:
  """The granularity of a reported largest row: whole attention blocks on each of the
  `sequence` devices a row is split over."""
  return sequence * max(1, min(cfg.attention_block, half // sequence))


def abstract_tree_batch(rows: int, row_tokens: int, sharding, extra=()) -> dict:
  """The tree step's batch (`TreeBatch.arrays()`) as ShapeDtypeStructs [rows, row_tokens]:
  the declared dtype of each token field, float32 loss weights (and `extra` arrays), int32
  tree structure."""
  def dtype(k):
    if k in FIELD:
      return jnp.dtype(FIELD[k].dtype)
    return jnp.float32 if k in WEIGHT_KEYS or k in extra else jnp.int32
  return {k: jax.ShapeDtypeStruct((rows, row_tokens), dtype(k), sharding=sharding)
          for k in DEVICE_KEYS + tuple(extra)}


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
