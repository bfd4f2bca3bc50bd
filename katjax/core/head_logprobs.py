"""Tree-token logprobs and entropies through the output projection, without [tokens, vocab].

`head_logprobs(h, w, batch)` equals `losses.token_logprobs(h @ w, batch)`: logp[i] =
log_softmax(h[parent[i]] @ w)[tokens[i]] and the entropy of that distribution, 0 where
parent < 0. Autodiff of the plain expression keeps the float32 logits of every token for
the backward pass (at Qwen's 151k vocabulary and 64k tree tokens: 39 GB). Here a scan over
chunks of tokens computes one chunk's logits at a time; the custom VJP recomputes them
chunk by chunk (the outputs are vectors whose cotangents are unknown in the forward pass,
so unlike `linear_cross_entropy` the gradients cannot be formed ahead): four matmuls with
the head instead of three, and only [chunk, vocab] alive in either pass.

With z the logits of one token, p = softmax(z), H = lse(z) - <p, z>:
  d logp / dz = onehot(token) - p          d H / dz = -p (z - <p, z>)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from katjax.core.linear_cross_entropy import default_chunk


def head_logprobs(h, w, batch, *, chunk: int | None = None):
  """h float[R, S, d]; w float[d, V]; batch parent, tokens int[R, S] -> (logp, entropy)
  float32[R, S].

  h: final hidden states in the compute dtype, w: the output projection in the same dtype
  (`katjax.model.hidden_states` returns both). chunk: tokens per scan step (default:
  `linear_cross_entropy.default_chunk` over the R * S tokens). Differentiable in h and w.
  """
  r, s, d = h.shape
  if w.ndim != 2 or w.shape[0] != d:
    raise ValueError(f"head_logprobs: w must be [d={d}, V], got {w.shape}")
  parent, tokens = batch["parent"], batch["tokens"]
  if parent.shape != (r, s) or tokens.shape != (r, s):
    raise ValueError(f"head_logprobs: parent {parent.shape} and tokens {tokens.shape} must "
                     f"both be {(r, s)}")
  if chunk is None:
    chunk = default_chunk(1, r * s, w.shape[1])
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"head_logprobs: chunk must be a positive int, got {chunk!r}")
  has = parent >= 0
  src = jnp.where(has, parent, 0)
  # The predicting token's hidden state: [R, S, d], small beside the logits.
  hp = jnp.take_along_axis(h, src[..., None], axis=1).reshape(r * s, d)
  logp, ent = _logp_entropy(hp, w, tokens.reshape(r * s).astype(jnp.int32), chunk)
  logp, ent = logp.reshape(r, s), ent.reshape(r, s)
  return jnp.where(has, logp, 0.0), jnp.where(has, ent, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logp_entropy(h, w, tokens, chunk):
  logp, ent, _ = _forward(h, w, tokens, chunk)
  return logp, ent


def _pad_chunks(x, chunk):
  """[N, ...] -> [n, chunk, ...], zero-padded."""
  n = x.shape[0]
  pad = (-n) % chunk
  if pad:
    x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  return x.reshape((-1, chunk) + x.shape[1:])


def _logits(hc, w):
  # In the compute dtype, as the Decoder's own head, then float32 for the softmax.
  return jnp.einsum("cd,dv->cv", hc, w).astype(jnp.float32)


def _forward(h, w, tokens, chunk):
  n = h.shape[0]

  def step(_, xs):
    hc, tc = xs
    z = _logits(hc, w)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0]
    mean_z = jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1)
    return None, (picked - lse, lse - mean_z, lse)

  _, outs = jax.lax.scan(step, None, (_pad_chunks(h, chunk), _pad_chunks(tokens, chunk)))
  return tuple(o.reshape(-1)[:n] for o in outs)


def _fwd(h, w, tokens, chunk):
  logp, ent, lse = _forward(h, w, tokens, chunk)
  return (logp, ent), (h, w, tokens, lse, ent)


def _bwd(chunk, res, cots):
  h, w, tokens, lse, ent = res
  g_logp, g_ent = (c.astype(jnp.float32) for c in cots)
  n = h.shape[0]
  multi = -(-n // chunk) > 1

  def step(dw, xs):
    hc, tc, lc, ec, gl, ge = xs
    z = _logits(hc, w)
    p = jnp.exp(z - lc[:, None])
    mean_z = (lc - ec)[:, None]
    dz = gl[:, None] * (jax.nn.one_hot(tc, z.shape[-1], dtype=jnp.float32) - p)
    dz = (dz - ge[:, None] * p * (z - mean_z)).astype(w.dtype)
    dh = jnp.einsum("cv,dv->cd", dz, w)
    # Float32 partial sums of dw over chunks (as linear_cross_entropy).
    dw = dw + jnp.einsum("cd,cv->dv", hc, dz,
                         preferred_element_type=jnp.float32 if multi else None)
    return dw, dh.astype(h.dtype)

  xs = tuple(_pad_chunks(x, chunk) for x in (h, tokens, lse, ent, g_logp, g_ent))
  dw, dh = jax.lax.scan(step, jnp.zeros(w.shape, jnp.float32), xs)
  return dh.reshape(-1, h.shape[1])[:n], dw.astype(w.dtype), None


_logp_entropy.defvjp(_fwd, _bwd)
