"""The train state (an immutable pytree) and the optimizer (AdamW, warmup + cosine, clipping).

`TrainState` holds only arrays: step, params, optimizer state, rng. A step returns a new
state; nothing is mutated. `make_optimizer` builds the one optimizer every stage uses from a
small config (a ConfigDict, a dict or any object with the same attribute names).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """step: int32[]; params: pytree; opt_state: optax state; rng: PRNG key."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng) -> "TrainState":
    """State at step 0 with a fresh optimizer state for `params`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=rng)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Defaults for `make_optimizer`; any field may be overridden by the config passed in."""

  learning_rate: float = 3e-4  # peak
  warmup_steps: int = 10
  total_steps: int = 1000  # warmup + cosine decay length
  end_lr_ratio: float = 0.1  # final lr = end_lr_ratio * peak
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # global-norm clip; <= 0 disables


def optimizer_config(opt_cfg=None) -> OptimizerConfig:
  """Normalise a ConfigDict / dict / OptimizerConfig / None into an OptimizerConfig."""
  if opt_cfg is None:
    return OptimizerConfig()
  if isinstance(opt_cfg, OptimizerConfig):
    return opt_cfg
  known = {f.name for f in dataclasses.fields(OptimizerConfig)}
  items = dict(opt_cfg.items()) if hasattr(opt_cfg, "items") else dict(vars(opt_cfg))
  unknown = sorted(set(items) - known)
  if unknown:
    raise ValueError(f"optimizer config: unknown field(s) {unknown}; known: {sorted(known)}")
  return OptimizerConfig(**items)


def make_schedule(opt_cfg=None) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to end_lr_ratio * peak."""
  c = optimizer_config(opt_cfg)
  if c.total_steps <= c.warmup_steps:
    raise ValueError(f"optimizer: total_steps={c.total_steps} must exceed "
                     f"warmup_steps={c.warmup_steps}")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=c.total_steps, end_value=c.learning_rate * c.end_lr_ratio)


def make_optimizer(opt_cfg=None) -> optax.GradientTransformation:
  """AdamW with warmup + cosine and global-norm clipping; no decay on norms and biases.

  The learning rate is injected as a hyperparameter so `current_lr(opt_state)` can report it.
  """
  c = optimizer_config(opt_cfg)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=make_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps,
      weight_decay=c.weight_decay, mask=_decay_mask)
  parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
  return optax.chain(*parts, adamw)


def current_lr(opt_state) -> jax.Array:
  """float32[]: lr of the latest update (at init: step 0's); NaN if none is injected."""
  found = []

  def visit(node):
    hyper = getattr(node, "hyperparams", None)
    if isinstance(hyper, dict) and "learning_rate" in hyper:
      found.append(hyper["learning_rate"])
    elif isinstance(node, (tuple, list)):
      for n in node:
        visit(n)

  visit(opt_state)
  return jnp.asarray(found[0], jnp.float32) if found else jnp.asarray(jnp.nan, jnp.float32)


def _decay_mask(params):
  # Decay matrices (kernels, embeddings); never norm scales or biases.
  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name in ("kernel", "embedding")

  return jax.tree_util.tree_map_with_path(keep, params)
