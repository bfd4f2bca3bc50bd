"""Language-model loss on packed rows (mid-training and SFT are the same loss fn).

The batch comes from `katjax.data` packing: `targets[i]` is the next token and `weights[i]`
is 1 only where that target is in the same segment and trainable (assistant tokens for
SFT), so nothing predicts across a document boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from katjax.model import forward


def lm_loss(cfg, params, batch, rng=None):
  """batch: int32[B, T] tokens/positions/subtree_end/targets/weights -> (sum, count, aux).

  loss_sum = -sum_i weights[i] * log p(targets[i] | tokens[<=i] of its segment); the
  denominator is the number of weighted tokens. Logits are float32.
  """
  del rng
  logits = forward(cfg, params, batch["tokens"], batch["positions"], batch["subtree_end"])
  logp = token_logprobs(logits, batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  count = jnp.sum(w)
  return -jnp.sum(w * logp), count, {"tokens": jnp.sum(batch["segment_ids"] > 0)}


def token_logprobs(logits, targets):
  """logits float[B, T, V], targets int[B, T] -> float32[B, T] log-softmax at the target."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - lse
