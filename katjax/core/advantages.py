"""Group-relative advantages (pure, jit-able): GRPO and RLOO.

Rollouts of the same task form a group (`group_ids`, dense ints in [0, num_groups)); the
advantage of a rollout is its reward relative to the rest of its group, so no value model is
needed. Both functions take `rewards: float[B]`, `group_ids: int[B]` and return float32[B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grpo_advantages(rewards, group_ids, num_groups: int | None = None, *,
                    normalize_std: bool = True, eps: float = 1e-6):
  """float32[B]: (r - mean_group) / (std_group + eps), or r - mean_group without std.

  std is the population std of the group (a group of identical rewards gets advantage 0).
  num_groups (static) defaults to B.
  """
  r, g, n = _prep(rewards, group_ids, num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(r), g, n)
  mean = jax.ops.segment_sum(r, g, n) / jnp.maximum(count, 1.0)
  centred = r - mean[g]
  if not normalize_std:
    return centred
  var = jax.ops.segment_sum(centred * centred, g, n) / jnp.maximum(count, 1.0)
  return centred / (jnp.sqrt(var)[g] + eps)


def rloo_advantages(rewards, group_ids, num_groups: int | None = None):
  """float32[B]: r_i - mean of the OTHER rewards of the group (leave-one-out baseline).

  A rollout alone in its group gets advantage 0.
  """
  r, g, n = _prep(rewards, group_ids, num_groups)
  count = jax.ops.segment_sum(jnp.ones_like(r), g, n)[g]
  total = jax.ops.segment_sum(r, g, n)[g]
  baseline = (total - r) / jnp.maximum(count - 1.0, 1.0)
  return jnp.where(count > 1, r - baseline, 0.0)


def _prep(rewards, group_ids, num_groups):
  r = jnp.asarray(rewards, jnp.float32)
  g = jnp.asarray(group_ids, jnp.int32)
  if r.ndim != 1 or g.shape != r.shape:
    raise ValueError(f"rewards and group_ids must both be [B], got {r.shape} and {g.shape}")
  if not isinstance(r, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(r))):
    raise ValueError("rewards contain NaN or inf")
  n = r.shape[0] if num_groups is None else int(num_groups)
  if not isinstance(g, jax.core.Tracer) and r.size and (int(g.min()) < 0 or int(g.max()) >= n):
    raise ValueError(f"group_ids must lie in [0, num_groups={n}), got [{int(g.min())}, "
                     f"{int(g.max())}]")
  return r, g, n
