"""Interval-mask attention: dense and blockwise against a NumPy reference on random trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from katjax.model import attention as attn, tile_attention


def random_tree_subtree_end(rng, t, n_pad=0):
  """subtree_end int[t] of a random pre-order tree of token chains, plus trailing padding.

  Built by recursion over nodes (not by the interval rule itself): each node is a chain of
  tokens; a child's span lies right after its parent's tokens, inside the parent's subtree.
  """
  real = t - n_pad
  se = np.zeros(t, np.int64)

  def build(start, end):  # fill [start, end) with a forest of subtrees
    while start < end:
      size = int(rng.integers(1, end - start + 1))
      node_len = int(rng.integers(1, size + 1))
      se[start:start + node_len] = start + size
      build(start + node_len, start + size)
      start += size

  build(0, real)
  se[real:] = np.arange(real, t) + 1
  return se


def numpy_attention(q, k, v, se):
  """Reference with the mask written as the definition: k <= q < se[k], loops over pairs."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q, dtype=np.float64)
  for bi in range(b):
    mask = np.zeros((t, t), bool)
    for qi in range(t):
      for ki in range(t):
        mask[qi, ki] = ki <= qi < se[bi, ki]
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi // g].T / np.sqrt(d)
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi // g]
  return out


@pytest.fixture(scope="module")
def tree_inputs():
  rng = np.random.default_rng(0)
  b, t, h, kv, d = 2, 40, 4, 2, 8
  q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
  se = np.stack([random_tree_subtree_end(rng, t, n_pad=3 * i) for i in range(b)])
  return q, k, v, se.astype(np.int32)


def test_dense_matches_numpy_reference(tree_inputs):
  q, k, v, se = tree_inputs
  ref = numpy_attention(q, k, v, se)
  qi = np.broadcast_to(np.arange(q.shape[1]), q.shape[:2])
  out = attn.dense_attention(q, k, v, se, qi)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blockwise_matches_numpy_reference(tree_inputs, block):
  q, k, v, se = tree_inputs
  ref = numpy_attention(q, k, v, se)
  out = attn.blockwise_attention(q, k, v, se, block=block)  # 40 % 16 != 0: exercises padding
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [16, 64])
def test_prefix_dense_matches_numpy_reference_and_dense_gradient(tree_inputs, chunk):
  """Query chunks against their key prefixes: same output as the reference on random trees
  (40 % 16 != 0: a short last chunk; 64 > 40: one chunk), same gradient as one dense block."""
  q, k, v, se = tree_inputs
  cot = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
  qi = np.broadcast_to(np.arange(q.shape[1]), q.shape[:2])

  def chunked(q, k, v):
    return attn.prefix_dense_attention(q, k, v, se, chunk=chunk)

  def grads(f):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1, 2)))(q, k, v)

  out = jax.jit(chunked)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, se), atol=1e-5,
                             rtol=1e-5)
  g_dense = grads(lambda q, k, v: attn.dense_attention(q, k, v, se, qi))
  for a, b in zip(g_dense, grads(chunked)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_blockwise_gradient_equals_dense(tree_inputs):
  q, k, v, se = tree_inputs
  cot = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)
  qi = np.broadcast_to(np.arange(q.shape[1]), q.shape[:2])

  def dense_loss(q, k, v):
    return jnp.sum(attn.dense_attention(q, k, v, se, qi) * cot)

  def block_loss(q, k, v):
    return jnp.sum(attn.blockwise_attention(q, k, v, se, block=16) * cot)

  g_dense = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
  g_block = jax.jit(jax.grad(block_loss, argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_dense, g_block):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_random_trees_many_seeds():
  """Dense and blockwise agree to 1e-5 across many random tree shapes."""
  rng = np.random.default_rng(2)
  b, t, h, kv, d = 1, 48, 2, 1, 8
  f = jax.jit(lambda q, k, v, se: (attn.blockwise_attention(q, k, v, se, block=16),
                                   attn.dense_attention(q, k, v, se, jnp.arange(t)[None])))
  for _ in range(20):
    q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    se = random_tree_subtree_end(rng, t, n_pad=int(rng.integers(0, 5)))[None].astype(np.int32)
    blockwise, dense = f(q, k, v, se)
    np.testing.assert_allclose(np.asarray(blockwise), np.asarray(dense), atol=1e-5, rtol=1e-5)


def test_block_skipping_is_exact_for_packed_documents():
  """Documents packed in a row: every block pair across documents is skipped, output exact."""
  rng = np.random.default_rng(3)
  t, block = 64, 16
  se = np.repeat(np.array([16, 32, 48, 64]), 16)[None].astype(np.int32)
  q, k, v = (rng.standard_normal((1, t, 2, 8)).astype(np.float32) for _ in range(3))
  out = attn.blockwise_attention(q, k, v, se, block=block)
  for doc in range(4):
    sl = slice(16 * doc, 16 * doc + 16)
    alone = attn.dense_attention(q[:, sl], k[:, sl], v[:, sl], np.full((1, 16), 16),
                                 jnp.arange(16)[None])
    np.testing.assert_allclose(np.asarray(out[:, sl]), np.asarray(alone), atol=1e-5)


# --- tile-list attention ----------------------------------------------------------------


@pytest.fixture(scope="module")
def long_tree_inputs():
  """Two 1024-token rows of random trees (the second ends in padding), a cotangent, and the
  dense reference's output and gradients."""
  rng = np.random.default_rng(5)
  b, t, h, kv, d = 2, 1024, 2, 1, 8
  q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
  se = np.stack([random_tree_subtree_end(rng, t, n_pad=100 * i) for i in range(b)])
  se = se.astype(np.int32)
  cot = rng.standard_normal(q.shape).astype(np.float32)
  qi = np.broadcast_to(np.arange(t), (b, t))

  def dense(q, k, v):
    out = attn.dense_attention(q, k, v, se, qi)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (q, k, v, se, cot), out, grads


@pytest.mark.parametrize("block", tile_attention.BLOCKS)
def test_tile_attention_forward_and_gradients_equal_dense(long_tree_inputs, block):
  """Every block size the kernel may be given: same output and dq, dk, dv as dense; the
  tile list padded beyond its length (padding entries are skipped)."""
  (q, k, v, se, cot), ref, ref_grads = long_tree_inputs
  tiles = tile_attention.attention_tiles(se, block)
  tiles = tile_attention.attention_tiles(se, block, length=tiles.shape[1] + 3)

  def loss(q, k, v):
    out = tile_attention.tile_attention(q, k, v, se, tiles, block=block)
    return jnp.sum(out * cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_tile_list_is_exactly_the_tiles_with_a_visible_pair():
  """Against a brute-force mask: a tile is listed iff some (q, k) in it has k <= q < se[k];
  the efficiency is visible pairs over listed tiles x block^2."""
  rng = np.random.default_rng(6)
  t, block = 256, 16
  se = np.stack([random_tree_subtree_end(rng, t, n_pad=9 * i) for i in range(3)])
  q_idx, k_idx = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
  tiles = tile_attention.attention_tiles(se, block)
  listed = 0
  for r in range(3):
    mask = (k_idx <= q_idx) & (q_idx < se[r][None, :])
    any_visible = mask.reshape(t // block, block, t // block, block).any(axis=(1, 3))
    want = {tuple(map(int, x)) for x in np.argwhere(any_visible)}
    got = {tuple(map(int, x)) for x in tiles[r] if x[0] >= 0}
    assert got == want
    listed += len(want)
  stats = tile_attention.tile_stats(se, block)
  visible = sum(((k_idx <= q_idx) & (q_idx < se[r][None, :])).sum() for r in range(3))
  assert stats["tiles"] == listed
  np.testing.assert_allclose(stats["efficiency"], visible / (listed * block * block))


def test_choose_block_prefers_small_tiles_on_bushy_trees():
  """Causal rows waste only the diagonal: the largest block wins; a row of many small
  subtrees wastes most of a large tile: a smaller block wins."""
  t = 2048
  causal = np.full((1, t), t, np.int32)
  bushy = (np.arange(t) // 32 * 32 + 32)[None].astype(np.int32)  # 64 documents of 32
  assert tile_attention.choose_block(causal) == max(tile_attention.BLOCKS)
  assert tile_attention.choose_block(bushy) < max(tile_attention.BLOCKS)
  with pytest.raises(ValueError, match="multiple"):
    tile_attention.attention_tiles(causal[:, :100], 64)


def test_decoder_with_a_tile_list_equals_dense_attention():
  """The tile list plumbed through the decoder (layer scan, custom VJP inside it): logits and
  parameter gradients equal the dense-attention decoder's on random tree rows."""
  from katjax import model as km

  rng = np.random.default_rng(7)
  t, block = 256, 64
  cfg = km.TINY.replace(attention_impl="dense", attention_block=block)
  params = km.init(cfg, jax.random.PRNGKey(0))
  se = np.stack([random_tree_subtree_end(rng, t, n_pad=30 * i) for i in range(2)])
  se = se.astype(np.int32)
  tokens = rng.integers(0, cfg.vocab_size, (2, t)).astype(np.int32)
  positions = rng.integers(0, t, (2, t)).astype(np.int32)  # RoPE positions are arbitrary here
  cot = rng.standard_normal((2, t, cfg.vocab_size)).astype(np.float32)
  tiles = tile_attention.attention_tiles(se, block)

  @jax.jit
  def both(params):
    def loss(p, tl):
      logits = km.forward(cfg, p, tokens, positions, se, tl)
      return jnp.sum(logits * cot), logits
    return [jax.value_and_grad(loss, has_aux=True)(params, tl) for tl in (None, tiles)]

  ((_, ref), ref_grads), ((_, out), grads) = both(params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # Float32 sums in another order: errors relative to the gradient's own scale.
    scale = float(np.max(np.abs(np.asarray(r))))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * scale, rtol=1e-5)
