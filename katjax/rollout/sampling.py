"""Per-step token choice for the sampler: greedy / temperature / top-k / top-p, logprobs, entropy.

Pure jit-able functions over a batch of logits; sampling settings are per-row arrays (the
`samp` dict built by the sampler), so one compiled step serves mixed requests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["sample", "filter_logits", "finished"]


def finished(tok, count, samp):
  """bool[B]: the token is a stop id or the row reached its max_new_tokens."""
  hit_stop = jnp.any(tok[:, None] == samp["stop_ids"], axis=-1)
  return hit_stop | (count >= samp["max_new"])


def sample(logits, keys, step, samp):
  """logits f32[B,V] -> (token, sampling logprob, raw logprob, entropy), each [B].

  samp["vocab"] int[B] (optional): only ids below it may be chosen; the sampling logprob is
  that of the distribution restricted to them (what was actually sampled from).
  """
  raw_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ent = -jnp.sum(jnp.exp(raw_logp) * raw_logp, axis=-1)
  if "vocab" in samp:
    # Ids past the tokenizer's vocabulary (the model's padded rows) are never chosen: they
    # have no text, so a record holding one could not be decoded or re-rendered. Raw logprob
    # and entropy stay those of the whole model (what training computes).
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None]
    logits = jnp.where(ids < samp["vocab"][:, None], logits, -jnp.inf)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temp = samp["temperature"]

  def stochastic(_):
    scaled = logits / jnp.where(temp > 0, temp, 1.0)[:, None]
    needs = jnp.any((temp > 0) & ((samp["top_p"] < 1) | (samp["top_k"] > 0)))
    filt = jax.lax.cond(needs, filter_logits, lambda s, p, k: s, scaled, samp["top_p"],
                        samp["top_k"])
    noise = jax.vmap(lambda k, s: jax.random.gumbel(jax.random.fold_in(k, s),
                                                    filt.shape[-1:]))(keys, step)
    tok = jnp.where(temp > 0, jnp.argmax(filt + noise, axis=-1).astype(jnp.int32), greedy)
    lp = jnp.take_along_axis(jax.nn.log_softmax(filt, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, jnp.where(temp > 0, lp, 0.0)

  tok, logp = jax.lax.cond(jnp.any(temp > 0), stochastic,
                           lambda _: (greedy, jnp.zeros_like(ent)), None)
  raw = jnp.take_along_axis(raw_logp, tok[:, None], axis=-1)[:, 0]
  return tok, logp, raw, ent


def filter_logits(scaled, top_p, top_k):
  """Top-k then top-p (nucleus) on f32[B,V]; removed entries become -inf.

  top_k int[B] (0 = off); top_p f32[B] (1 = off) keeps the smallest prefix of the sorted
  distribution (after top-k) whose mass reaches top_p. Ties at the threshold are kept.
  """
  v = scaled.shape[-1]
  srt = -jnp.sort(-scaled, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  ranks = jnp.arange(v)[None]
  in_k = ranks < k[:, None]
  p = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
  before = jnp.cumsum(p, axis=-1) - p
  keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1))
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
  thresh = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)
  return jnp.where(scaled >= thresh, scaled, -jnp.inf)
