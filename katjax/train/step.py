"""The generic pure train step: exact micro-batch accumulation, skip of non-finite steps.

`train_step(state, batch, *, loss_fn, optimizer, micro_batches=1) -> (state, metrics)`.
`loss_fn(params, batch, rng) -> (loss_sum, denom, aux)` returns a SUM of per-token losses and
the number it is to be divided by (tokens, or any weight total that does not depend on the
params). The step minimises  sum_m loss_sum_m / sum_m denom_m  over the micro-batches, so
accumulating over 4 micro-batches is the same update as one big batch, whatever the number of
loss tokens in each. Aux metrics are summed over micro-batches (return sums, not means).

Wrap it yourself: `jax.jit(functools.partial(train_step, loss_fn=..., optimizer=...),
in_shardings=..., out_shardings=..., donate_argnums=0)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from katjax.train.state import TrainState, current_lr


def train_step(state: TrainState, batch, *, loss_fn, optimizer: optax.GradientTransformation,
               micro_batches: int = 1):
  """One optimizer update. batch: pytree of arrays [B, ...]; B divisible by micro_batches.

  Metrics: loss (= total loss_sum / total denom), denom, grad_norm (before clipping), lr,
  skipped (1 when the gradient or loss was not finite: params and optimizer state are then
  left unchanged, only step and rng advance), plus the summed aux metrics of loss_fn.
  """
  rng, step_rng = jax.random.split(state.rng)
  loss_sum, denom, aux, grads = accumulate_gradients(loss_fn, state.params, batch, step_rng,
                                                     micro_batches)
  scale = 1.0 / jnp.maximum(denom, 1e-9)
  grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss_sum)
  # Zero out non-finite grads before the update so NaNs never reach the optimizer moments.
  safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, new_opt = optimizer.update(safe, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
  params = jax.tree.map(keep, new_params, state.params)
  opt_state = jax.tree.map(keep, new_opt, state.opt_state)
  metrics = {"loss": loss_sum * scale, "denom": denom, "grad_norm": grad_norm,
             "lr": current_lr(opt_state), "skipped": (~finite).astype(jnp.int32), **aux}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def accumulate_gradients(loss_fn, params, batch, rng, micro_batches: int = 1):
  """(loss_sum, denom, aux, grad of loss_sum) summed over micro-batches of `batch`.

  Micro-batch m takes rows m, m + M, m + 2M, ... (strided), so every data-parallel shard of
  a batch-sharded array contributes to every micro-batch. RNG is split per micro-batch.
  """
  if not isinstance(micro_batches, int) or micro_batches < 1:
    raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")

  def grad_fn(p, b, key):
    def f(p_):
      loss_sum, denom, aux = loss_fn(p_, b, key)
      return loss_sum, (denom, aux)

    (loss_sum, (denom, aux)), g = jax.value_and_grad(f, has_aux=True)(p)
    denom = jax.lax.stop_gradient(jnp.asarray(denom, jnp.float32))
    return jnp.asarray(loss_sum, jnp.float32), denom, aux, g

  if micro_batches == 1:
    return grad_fn(params, batch, rng)

  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
  (size,) = sizes
  if size % micro_batches:
    raise ValueError(f"batch size {size} is not divisible by micro_batches={micro_batches}")

  def split(x):
    x = x.reshape((size // micro_batches, micro_batches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro = jax.tree.map(split, batch)
  keys = jax.random.split(rng, micro_batches)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, first, keys[0])
  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    b, key = xs
    out = grad_fn(params, b, key)
    return jax.tree.map(jnp.add, carry, out), None

  total, _ = jax.lax.scan(body, zero, (micro, keys))
  return total
