"""Weighted next-token NLL through the output projection, without the [B, T, V] logits.

`linear_cross_entropy(h, w, targets, weights) = -sum weights * log softmax(h @ w)[targets]`.
Autodiff of the plain expression keeps the float32 logits of the whole batch for the
backward pass (B x T x V: 134 MB for 8 x 512 tokens of an 8k vocabulary, 4.9 GB for Qwen's
151k at 8k tokens) and walks them through memory several times. Here a scan over chunks of
positions computes each chunk's logits, its loss and, right away, its share of both
gradients, so only one chunk's logits live at a time, hot in cache. The custom VJP then only
scales the stored gradients by the incoming cotangent, which is exact because the output is
one scalar. Same FLOPs as autodiff (three matmuls with the head).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Default logits elements per chunk: 16 MB of float32, about what stays in a CPU's caches.
# On accelerators pass far more (katjax.train.losses does): each scan step should stay a big
# matmul, since a long scan of small steps serialises the device.
CHUNK_ELEMENTS = 1 << 22
# ...but never fewer tokens per chunk than this: each chunk also touches all of w (the
# gradient sum, dtype conversions on CPU), a cost per chunk that only many tokens amortise
# (SmolLM2's 49k vocabulary at 64 tokens per chunk ran its SFT step 6% slower).
MIN_CHUNK_TOKENS = 512


def linear_cross_entropy(h, w, targets, weights, *, chunk: int | None = None,
                         chunk_elements: int = CHUNK_ELEMENTS):
  """Scalar float32 loss sum.

  h float[B, T, d] (final hidden states, compute dtype); w float[d, V] (output projection
  in the same dtype); targets int[B, T]; weights float[B, T] (0 = no loss; not
  differentiated). chunk: positions per scan step (default: `default_chunk`). Gradients
  flow to h and w in their own dtypes; the softmax is float32.
  """
  b, t, d = h.shape
  if w.ndim != 2 or w.shape[0] != d:
    raise ValueError(f"linear_cross_entropy: w must be [d={d}, V], got {w.shape}")
  if targets.shape != (b, t) or weights.shape != (b, t):
    raise ValueError(f"linear_cross_entropy: targets {targets.shape} and weights "
                     f"{weights.shape} must both be {(b, t)}")
  if chunk is None:
    chunk = default_chunk(b, t, w.shape[1], chunk_elements)
  if not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"linear_cross_entropy: chunk must be a positive int, got {chunk!r}")
  return _loss(h, w, targets, weights.astype(jnp.float32), chunk)


def default_chunk(b: int, t: int, vocab: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
  """Positions per chunk: the largest power of two (so power-of-two lengths need no
  padding) with b * chunk * vocab <= chunk_elements, or with b * chunk <= MIN_CHUNK_TOKENS
  if that is more; at most t."""
  tokens = max(MIN_CHUNK_TOKENS, chunk_elements // vocab)
  fit = max(1, tokens // b)
  return min(t, 1 << (fit.bit_length() - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(h, w, targets, weights, chunk):
  return _scan_chunks(h, w, targets, weights, chunk, with_grads=False)[0]


def _scan_chunks(h, w, targets, weights, chunk, *, with_grads):
  """(loss, (dh, dw) or None): one scan over chunks of `chunk` positions."""
  b, t, d = h.shape
  pad = (-t) % chunk
  if pad:  # padded positions carry weight 0: no loss, no gradient
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = (t + pad) // chunk

  def by_chunk(x):  # [B, T, ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

  def step(carry, xs):
    loss, dw = carry
    hc, tc, wc = xs
    # Matmuls in the compute dtype, as the Decoder's own head (bf16 logits for a bf16
    # model; on CPU a float32-accumulating bf16 dot converts all of w every chunk).
    logits = jnp.einsum("bcd,dv->bcv", hc, w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    loss = loss - jnp.sum(wc * (picked - lse))
    if not with_grads:
      return (loss, dw), None
    # d loss / d logits = weight * (softmax - onehot(target))
    dlogits = jnp.exp(logits - lse[..., None])
    dlogits = dlogits - jax.nn.one_hot(tc, logits.shape[-1], dtype=jnp.float32)
    dlogits = (dlogits * wc[..., None]).astype(w.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w)
    # Several chunks: float32 partial sums (rounding each chunk's share to bf16 before adding
    # loses accuracy). One chunk: one rounding anyway, as autodiff of the plain head does.
    dw = dw + jnp.einsum("bcd,bcv->dv", hc, dlogits,
                         preferred_element_type=jnp.float32 if n > 1 else None)
    return (loss, dw), dh.astype(h.dtype)

  dw0 = jnp.zeros(w.shape, jnp.float32) if with_grads else None
  (loss, dw), dh = jax.lax.scan(step, (jnp.zeros((), jnp.float32), dw0),
                                (by_chunk(h), by_chunk(targets), by_chunk(weights)))
  if not with_grads:
    return loss, None
  dh = jnp.moveaxis(dh, 0, 1).reshape(b, t + pad, d)[:, :t]
  return loss, (dh, dw.astype(w.dtype))


def _loss_fwd(h, w, targets, weights, chunk):
  return _scan_chunks(h, w, targets, weights, chunk, with_grads=True)


def _loss_bwd(chunk, grads, g):
  del chunk
  dh, dw = grads
  return (dh * g.astype(dh.dtype), dw * g.astype(dw.dtype), None, None)


_loss.defvjp(_loss_fwd, _loss_bwd)
