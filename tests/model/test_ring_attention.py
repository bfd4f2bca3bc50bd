"""Ring (sequence-parallel) attention == a NumPy dense reference, values and gradients.

The reference builds the T x T interval mask from its definition (k <= q < subtree_end[k])
and runs softmax attention in float64 NumPy; its gradient is the analytic softmax backward.
The ring runs on meshes whose `sequence` axis has 2 and 4 fake CPU devices, on rows shaped
like packed prefix trees (several branches, padding) and on random valid intervals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from katjax.core.tree_pack import pack_trees
from katjax.model.attention import attention
from katjax.model.ring_attention import ring_attention
from katjax.parallel import make_mesh
from katjax.testing.trees import random_group

B, T, H, KV, D = 2, 64, 4, 2, 8
BLOCK = 8  # several blocks per shard: the in-shard skips and offsets are exercised


def _reference(q, k, v, se, g_out):
  """float64 NumPy attention and its gradient (dq, dk, dv) for the cotangent g_out."""
  q, k, v, g_out = (np.asarray(x, np.float64) for x in (q, k, v, g_out))
  t = q.shape[1]
  rep = H // KV
  kh, vh = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # [B, T, H, D]
  idx = np.arange(t)
  mask = (idx[None, :] <= idx[:, None])[None] & (idx[None, :, None] < se[:, None, :])
  s = np.einsum("bqhd,bkhd->bhqk", q, kh) / np.sqrt(D)
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, vh)
  dp = np.einsum("bqhd,bkhd->bhqk", g_out, vh)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) / np.sqrt(D)
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kh)
  dkh = np.einsum("bhqk,bqhd->bkhd", ds, q)
  dvh = np.einsum("bhqk,bqhd->bkhd", p, g_out)
  fold = lambda x: x.reshape(B, t, KV, rep, D).sum(3)  # noqa: E731 - heads sharing a kv head
  return out, (dq, fold(dkh), fold(dvh))


def _tree_rows(seed):
  rng = np.random.default_rng(seed)
  groups = [random_group(rng, vocab_size=16, branches=5, group_id=g) for g in range(3)]
  return pack_trees(groups, T, num_rows=B).subtree_end


def _random_rows(seed):
  rng = np.random.default_rng(seed)
  return np.stack([[rng.integers(i + 1, T + 1) for i in range(T)] for _ in range(B)]
                  ).astype(np.int32)


@pytest.mark.parametrize("shape", [dict(data=2, sequence=2, tensor=2), dict(fsdp=2, sequence=4)])
def test_ring_attention_equals_dense_reference(shape):
  mesh = make_mesh(**{"data": 1, **shape})
  rng = np.random.default_rng(0)

  @jax.jit
  def fn(q, k, v, se, g):
    out, pull = jax.vjp(lambda q, k, v: ring_attention(q, k, v, se, mesh=mesh, block=BLOCK),
                        q, k, v)
    return out, pull(g)

  for se in (_tree_rows(1), _random_rows(2)):
    assert (se < T).any() and (se > np.arange(T) + 1).any()  # not plain causal nor diagonal
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k, v = (rng.normal(size=(B, T, KV, D)).astype(np.float32) for _ in range(2))
    g = rng.normal(size=(B, T, H, D)).astype(np.float32)
    out, (dq, dk, dv) = fn(q, k, v, se, g)
    ref_out, (rdq, rdk, rdv) = _reference(q, k, v, se, g)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in ((dq, rdq), (dk, rdk), (dv, rdv)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dispatch_uses_the_ring_only_with_a_sequence_axis():
  mesh = make_mesh(data=4, sequence=2)
  se = _tree_rows(1)
  rng = np.random.default_rng(4)
  q = rng.normal(size=(B, T, H, D)).astype(np.float32)
  k, v = (rng.normal(size=(B, T, KV, D)).astype(np.float32) for _ in range(2))
  lowered = jax.jit(lambda q, k, v: attention(q, k, v, se, mesh=mesh, block=BLOCK)).lower(
      q, k, v)
  assert "collective_permute" in lowered.as_text()
  plain = jax.jit(lambda q, k, v: attention(q, k, v, se, mesh=make_mesh(data=8), block=BLOCK))
  assert "collective_permute" not in plain.lower(q, k, v).as_text()


def test_row_not_divisible_by_the_sequence_axis_is_refused():
  mesh = make_mesh(data=2, sequence=4)
  x = jnp.zeros((B, 62, H, D))
  kv = jnp.zeros((B, 62, KV, D))
  with pytest.raises(ValueError, match=r"row length 62 is not divisible .* sequence axis of "
                                       r"size 4"):
    ring_attention(x, kv, kv, jnp.full((B, 62), 62, jnp.int32), mesh=mesh)
