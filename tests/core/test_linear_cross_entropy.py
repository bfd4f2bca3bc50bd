"""linear_cross_entropy: value and gradients against the plain logits computation; memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from katjax.core.linear_cross_entropy import default_chunk, linear_cross_entropy


def plain_loss(h, w, targets, weights):
  """The definition: full float32 logits, log-softmax, weighted sum at the targets."""
  logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return -jnp.sum(weights * picked)


def inputs(b=2, t=37, d=16, v=50, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((b, t, d)).astype(np.float32)
  w = (rng.standard_normal((d, v)) * 0.3).astype(np.float32)
  targets = rng.integers(0, v, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) < 0.7).astype(np.float32) * rng.uniform(0.5, 2, (b, t))
  return h, w, targets, weights.astype(np.float32)


# t = 37: chunks of 8 leave a padded last chunk; {} is the default rule (one chunk here).
@pytest.mark.parametrize("kwargs", [dict(chunk=1), dict(chunk=8), dict(chunk=37),
                                    dict(chunk=64), {}])
def test_value_and_gradients_equal_plain_logits(kwargs):
  h, w, targets, weights = inputs()
  ref, ref_grads = jax.value_and_grad(plain_loss, argnums=(0, 1))(h, w, targets, weights)
  fn = jax.jit(jax.value_and_grad(
      lambda h, w: 3.0 * linear_cross_entropy(h, w, targets, weights, **kwargs),
      argnums=(0, 1)))
  val, grads = fn(h, w)
  np.testing.assert_allclose(val, 3.0 * ref, rtol=1e-5)
  for g, r in zip(grads, ref_grads):  # the cotangent (3.0) scales the stored gradients
    np.testing.assert_allclose(g, 3.0 * np.asarray(r), rtol=1e-4, atol=1e-5)
  # The primal alone (no gradient: eval) gives the same value.
  np.testing.assert_allclose(linear_cross_entropy(h, w, targets, weights, **kwargs), ref,
                             rtol=1e-5)


def test_bfloat16_inputs_keep_their_dtype_and_are_as_accurate_as_plain_bfloat16():
  """bf16 h and w: gradients come back in bf16, the loss in float32, and the error against
  the float32 computation on the same (bf16-rounded) inputs is no larger than that of the
  plain bf16 logits computation."""
  h, w, targets, weights = inputs(seed=1)
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  val, grads = jax.value_and_grad(
      lambda h, w: linear_cross_entropy(h, w, targets, weights, chunk=8), argnums=(0, 1))(hb, wb)
  assert val.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
  plain_val, plain_grads = jax.value_and_grad(plain_loss, argnums=(0, 1))(hb, wb, targets,
                                                                         weights)
  exact_val, exact_grads = jax.value_and_grad(plain_loss, argnums=(0, 1))(
      jnp.asarray(hb, jnp.float32), jnp.asarray(wb, jnp.float32), targets, weights)
  assert abs(val - exact_val) <= abs(plain_val - exact_val) + 1e-4 * abs(exact_val)
  for g, p, e in zip(grads, plain_grads, exact_grads):
    err = np.max(np.abs(np.asarray(g, np.float32) - e))
    plain_err = np.max(np.abs(np.asarray(p, np.float32) - e))
    assert err <= 1.5 * plain_err, (err, plain_err)


def test_gradient_memory_does_not_hold_the_logits():
  """The compiled gradient keeps one chunk of logits, not [B, T, V]: temp memory below a
  quarter of the logits' size, where the plain computation needs more than all of it."""
  b, t, d, v = 4, 1024, 64, 4096
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
  logits_bytes = b * t * v * 4

  def temp_bytes(loss):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes

  chunked = temp_bytes(lambda *a: linear_cross_entropy(*a, chunk=64))
  plain = temp_bytes(plain_loss)
  assert plain > logits_bytes
  assert chunked < logits_bytes / 4, (chunked, logits_bytes)


def test_default_chunk_rule():
  """Cache-sized logits chunks, but at least 512 tokens; powers of two; at most T."""
  assert default_chunk(8, 512, 8192) == 64  # 2^22 / 8192 = 512 tokens = 8 rows x 64
  assert default_chunk(1, 512, 49152) == 512  # 85 tokens by the budget: 512 by the floor
  assert default_chunk(4, 512, 272) == 512  # capped at T
  assert default_chunk(3, 4096, 8192) == 128  # 512 / 3 = 170 -> 128
  assert default_chunk(8, 8192, 151936, 1 << 28) == 128  # 1766 tokens / 8 = 220 -> 128


def test_bad_shapes_name_the_argument():
  h, w, targets, weights = inputs()
  with pytest.raises(ValueError, match="w must be"):
    linear_cross_entropy(h, w.T, targets, weights)
  with pytest.raises(ValueError, match="targets"):
    linear_cross_entropy(h, w, targets[:, 1:], weights)
  with pytest.raises(ValueError, match="chunk"):
    linear_cross_entropy(h, w, targets, weights, chunk=0)
