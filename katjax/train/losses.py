"""Language-model loss on packed rows (mid-training and SFT are the same loss fn).

The batch comes from `katjax.data` packing: `targets[i]` is the next token and `weights[i]`
is 1 only where that target is in the same segment and trainable (assistant tokens for
SFT), so nothing predicts across a document boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from katjax.core.linear_cross_entropy import CHUNK_ELEMENTS, linear_cross_entropy
from katjax.model.api import hidden_states


def _chunk_elements() -> int:
  """Logits per loss chunk: cache-sized on CPU; 1 GB of float32 on GPU/TPU (big matmuls per
  step, and a bounded footprint at Qwen's 151k vocabulary)."""
  return CHUNK_ELEMENTS if jax.default_backend() == "cpu" else 1 << 28


def lm_loss(cfg, params, batch, rng=None):
  """batch: int32[B, T] tokens/positions/subtree_end/targets/weights -> (sum, count, aux).

  loss_sum = -sum_i weights[i] * log p(targets[i] | tokens[<=i] of its segment); the
  denominator is the number of weighted tokens. The softmax is float32; the [B, T, V] logits
  are never materialised (`katjax.core.linear_cross_entropy`).
  """
  del rng
  hidden, head = hidden_states(cfg, params, batch["tokens"], batch["positions"],
                               batch["subtree_end"])
  w = batch["weights"].astype(jnp.float32)
  loss_sum = linear_cross_entropy(hidden, head, batch["targets"], w,
                                  chunk_elements=_chunk_elements())
  return loss_sum, jnp.sum(w), {"tokens": jnp.sum(batch["segment_ids"] > 0)}

