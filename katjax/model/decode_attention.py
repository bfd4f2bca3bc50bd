"""Attention of a few new queries against one layer's KV cache (prefill and decode).

The cache is stored head-major, k and v float[B, KV, S, D], so both products are plain
batched matmuls over (B, KV) with no transpose of the cache: scores contract D against
[S, D] and the output contracts S against [S, D]. Cache slot `s` is visible to a query at
slot `q` iff `s <= q` (one causal row per batch item; tree rollouts fork by copying rows),
the same rule as `attention.visible` with `subtree_end` = S.

Shapes: q float[B, T, H, D]; q_index int[B, T] (the query's own slot); H % KV == 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity", as in attention.py: no NaNs from exp() or max()


def write_cache(cache, k, v, cache_index):
  """Scatter new k, v float[B, T, KV, D] into slots cache_index[b] + t of one layer's cache."""
  b, t = k.shape[:2]
  rows = jnp.arange(b)[:, None]
  slots = cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)
  # Advanced indices on dims 0 and 2 around a slice: numpy puts the indexed dims first, so
  # the update is laid out [B, T, KV, D], exactly like k and v.
  put = lambda c, x: c.at[rows, :, slots].set(x.astype(c.dtype))
  return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


def cached_attention(q, cache, q_index):
  """out float[B, T, H, D]: each query attends to the cache slots up to its own."""
  b, t, h, d = q.shape
  k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
  kv, s = k.shape[1], k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  mask = (jnp.arange(s, dtype=jnp.int32)[None, None, :] <= q_index[:, :, None])[:, None, None]
  probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
  # A query with no visible slot cannot occur (it sees its own), but keep padding at zero.
  probs = jnp.where(mask, probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)
