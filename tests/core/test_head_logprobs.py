"""head_logprobs: tree logprobs and entropies against full logits (value, gradient, memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from katjax.core.head_logprobs import head_logprobs


def plain(h, w, parent, tokens):
  """The definition, in NumPy-style jnp: full float32 logits, log-softmax at the parent row."""
  logits = jnp.einsum("rsd,dv->rsv", h, w)
  logq = jax.nn.log_softmax(logits, axis=-1)
  src = jnp.maximum(parent, 0)
  rows = jnp.arange(h.shape[0])[:, None]
  lq = logq[rows, src]  # [R, S, V]: the predicting distribution of each token
  logp = jnp.take_along_axis(lq, tokens[..., None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(lq) * lq, axis=-1)
  has = parent >= 0
  return jnp.where(has, logp, 0.0), jnp.where(has, ent, 0.0)


def inputs(r=2, s=29, d=16, v=50, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((r, s, d)).astype(np.float32)
  w = (rng.standard_normal((d, v)) * 0.5).astype(np.float32)
  # Tree parents: any earlier index (branch points predict several children), -1 for roots.
  parent = np.array([[-1] + [int(rng.integers(-1, i)) for i in range(1, s)] for _ in range(r)],
                    np.int32)
  tokens = rng.integers(0, v, (r, s)).astype(np.int32)
  a, b = (rng.standard_normal((r, s)).astype(np.float32) for _ in range(2))
  return h, w, {"parent": parent, "tokens": tokens}, a, b


# 58 tokens: chunks of 8 leave a padded last chunk; 1 and 58+ are the extremes; {} default.
@pytest.mark.parametrize("kwargs", [dict(chunk=1), dict(chunk=8), dict(chunk=100), {}])
def test_values_and_gradients_equal_full_logits(kwargs):
  h, w, batch, a, b = inputs()

  def objective(fn):
    def f(h, w):
      logp, ent = fn(h, w)
      return jnp.sum(a * logp + b * ent), (logp, ent)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, ref), ref_grads = objective(lambda h, w: plain(h, w, batch["parent"], batch["tokens"]))(
      h, w)
  (_, out), grads = objective(lambda h, w: head_logprobs(h, w, batch, **kwargs))(h, w)
  for o, r in zip(out, ref):
    np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out[0])[batch["parent"] < 0] == 0)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_gradient_memory_does_not_hold_the_logits():
  """At vocab 32k the compiled gradient keeps one chunk of logits: temp memory below a
  quarter of the [tokens, vocab] float32 array, where the full-logits computation needs more
  than all of it."""
  r, s, d, v = 1, 4096, 64, 32768
  f32, i32 = jnp.float32, jnp.int32
  args = (jax.ShapeDtypeStruct((r, s, d), f32), jax.ShapeDtypeStruct((d, v), f32),
          jax.ShapeDtypeStruct((r, s), i32), jax.ShapeDtypeStruct((r, s), i32))
  logits_bytes = r * s * v * 4

  def temp_bytes(fn):
    def loss(h, w, parent, tokens):
      logp, ent = fn(h, w, {"parent": parent, "tokens": tokens})
      return jnp.sum(logp) + jnp.sum(ent)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(head_logprobs)
  full = temp_bytes(lambda h, w, bt: plain(h, w, bt["parent"], bt["tokens"]))
  assert full > logits_bytes
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def test_bad_input_names_the_argument():
  h, w, batch, _, _ = inputs()
  with pytest.raises(ValueError, match="w must be"):
    head_logprobs(h, w.T, batch)
  with pytest.raises(ValueError, match="parent"):
    head_logprobs(h, w, {"parent": batch["parent"][:, 1:], "tokens": batch["tokens"]})
  with pytest.raises(ValueError, match="chunk"):
    head_logprobs(h, w, batch, chunk=0)
