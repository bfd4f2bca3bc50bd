"""Attention under the one mask representation: intervals `subtree_end`.

Key `k` is visible to query `q` iff `k <= q < subtree_end[k]` (DESIGN.md section 2). Causal
attention is `subtree_end = T`; packed documents and prefix trees are other values. Two
implementations share that rule:

- `dense_attention`: builds the boolean mask block inside the kernel; for short rows and for
  decoding against a KV cache (queries at arbitrary `q_index`). Short self-attention rows run
  it per query chunk against the keys up to the chunk (`prefix_dense_attention`).
- `tile_attention` (its own module): flash-style over a host-made list of the tiles that hold
  visible pairs, for tree rows; chosen when the caller passes the list.
- `ring_attention` (its own module): the row's tokens sharded over the mesh axis `sequence`,
  keys and values passed around the ring of those devices; chosen when the caller passes a
  mesh whose `sequence` axis has more than one device (context parallelism).
- `blockwise_attention`: flash-style online softmax, `lax.scan` over key blocks, a custom VJP
  that recomputes scores blockwise, so neither pass materialises a T x T buffer; blocks that
  the intervals rule out (future keys, finished subtrees) are skipped with `lax.cond`.

Shapes: q float[B, Tq, H, D]; k, v float[B, Tk, KV, D] with H % KV == 0 (grouped-query).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from katjax.model.ring_attention import ring_attention, sequence_size
from katjax.model.tile_attention import tile_attention

_NEG = -1e30  # finite "minus infinity": keeps exp() and max() free of NaNs


def visible(q_index, k_index, subtree_end):
  """Mask bool[B, Tq, Tk]: q_index int[B, Tq], k_index int[Tk], subtree_end int[B, Tk]."""
  q = q_index[:, :, None]
  return (k_index[None, None, :] <= q) & (q < subtree_end[:, None, :])


def attention(q, k, v, subtree_end, *, impl="auto", block=512, dense_max_len=1024,
              q_index=None, tiles=None, mesh=None):
  """Dispatch: out float[B, Tq, H, D]. `q_index` defaults to arange(Tq) (self-attention).

  tiles int32[B, N, 2]: a tile list from `tile_attention.attention_tiles(subtree_end,
  block)`; given, `tile_attention` computes only those tiles (whatever `impl`).
  mesh: a `jax.sharding.Mesh` whose `sequence` axis has n > 1 devices: the row is split
  over them and `ring_attention` runs (ahead of `impl` and `tiles`, which see a whole row).
  """
  tq = q.shape[1]
  if q_index is not None:
    return dense_attention(q, k, v, subtree_end, q_index)
  if sequence_size(mesh) > 1:
    return ring_attention(q, k, v, subtree_end, mesh=mesh, block=block)
  if tiles is not None:
    return tile_attention(q, k, v, subtree_end, tiles, block=block)
  if impl == "dense" or (impl == "auto" and tq <= dense_max_len):
    return prefix_dense_attention(q, k, v, subtree_end)
  return blockwise_attention(q, k, v, subtree_end, block=block)


# Queries per chunk of `prefix_dense_attention`: at T=512 (4 chunks) the attention's forward
# and backward take ~30% less time than one dense T x T block on this project's CPU.
QUERY_CHUNK = 128


def prefix_dense_attention(q, k, v, subtree_end, chunk=QUERY_CHUNK):
  """Self-attention as dense query chunks, each against only the keys up to its last query.

  Exact for every interval mask (a key after its query is never visible), and it skips the
  score blocks above the diagonal: with n chunks, (n - 1) / 2n of the T x T work.
  """
  b, t = q.shape[:2]
  outs = []
  for start in range(0, t, chunk):
    end = min(start + chunk, t)
    q_index = jnp.broadcast_to(jnp.arange(start, end, dtype=jnp.int32), (b, end - start))
    outs.append(dense_attention(q[:, start:end], k[:, :end], v[:, :end],
                                subtree_end[:, :end], q_index))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def dense_attention(q, k, v, subtree_end, q_index):
  """Reference-style attention with the interval mask built in place. out float[B,Tq,H,D]."""
  b, tq, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, tq, kv, h // kv, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  mask = visible(q_index, jnp.arange(k.shape[1], dtype=jnp.int32), subtree_end)
  scores = jnp.where(mask[:, None, None], scores, _NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  # A query with no visible key (only padding slots of a cache) gets zeros, not NaNs.
  probs = jnp.where(mask[:, None, None], probs, 0.0).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, tq, h, d).astype(q.dtype)


def blockwise_attention(q, k, v, subtree_end, *, block=512):
  """Flash-style attention over self-attention rows. out float[B, T, H, D]."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  blk = min(block, t)
  pad = (-t) % blk
  if pad:
    # Padded keys are never visible (index > every real query); padded queries are dropped.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    tail = jnp.arange(t, t + pad, dtype=subtree_end.dtype) + 1
    subtree_end = jnp.concatenate([subtree_end, jnp.broadcast_to(tail, (b, pad))], axis=1)
  qg = q.reshape(b, t + pad, kv, h // kv, d)
  out = _flash(qg, k, v, subtree_end.astype(jnp.int32), blk)
  return out.reshape(b, t + pad, h, d)[:, :t]


# --- flash kernel with a recomputing VJP -------------------------------------------------


def _blocks(x, blk):
  """[B, T, ...] -> [T/blk, B, blk, ...] for scanning."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // blk, blk, *x.shape[2:]), 1, 0)


def _unblocks(x):
  n, b, blk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * blk, *x.shape[3:])


def _block_scores(qb, kb, se_b, qi, kj, blk):
  """Scores float32[B, KV, G, bq, bk] and mask bool[B, 1, 1, bq, bk] of one block pair."""
  d = qb.shape[-1]
  s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * d ** -0.5
  q_idx = qi * blk + jnp.arange(blk, dtype=jnp.int32)
  k_idx = kj * blk + jnp.arange(blk, dtype=jnp.int32)
  mask = visible(jnp.broadcast_to(q_idx, se_b.shape), k_idx, se_b)[:, None, None]
  return jnp.where(mask, s, _NEG), mask


def _skip(qi, kj, se_b, blk):
  """True when no query of block qi can see any key of block kj (whole batch)."""
  future = kj * blk > qi * blk + blk - 1
  closed = jnp.max(se_b) <= qi * blk
  return future | closed


def _tie(x, se):
  """Make `se` depend on `x` as far as JAX's partial evaluation can see.

  Under an outer `lax.scan` (the decoder's layer scan) `subtree_end` is loop-invariant, and
  JAX hoists every loop-invariant value out of the loop when it differentiates, nested loops
  included: the per-block masks of all (query block, key block) pairs would be computed once
  and stored, O(T^2) memory. An optimization barrier over (x, se) makes the masks depend on
  the loop-varying `x`, so they stay inside the loop, one block at a time.
  """
  return lax.optimization_barrier((x, se))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qg, k, v, se, blk):
  return _flash_fwd(qg, k, v, se, blk)[0]


def _flash_fwd(qg, k, v, se, blk):
  qg, se = _tie(qg, se)
  q_blocks, k_blocks, v_blocks, se_blocks = (_blocks(x, blk) for x in (qg, k, v, se))
  nb = q_blocks.shape[0]
  b, _, kv, g, d = qg.shape

  def one_query_block(args):
    qi, qb = args

    def step(carry, j):
      def compute(c):
        o, m, l = c
        s, mask = _block_scores(qb, k_blocks[j], se_blocks[j], qi, j, blk)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_new = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blocks.dtype), v_blocks[j],
                        preferred_element_type=jnp.float32)
        return o * corr[..., None] + pv, m_new, l_new

      return lax.cond(_skip(qi, j, se_blocks[j], blk), lambda c: c, compute, carry), None

    init = (jnp.zeros((b, kv, g, blk, d), jnp.float32), jnp.full((b, kv, g, blk), _NEG),
            jnp.zeros((b, kv, g, blk), jnp.float32))
    (o, m, l), _ = lax.scan(step, init, jnp.arange(nb))
    l = jnp.maximum(l, 1e-30)
    o = o / l[..., None]
    lse = m + jnp.log(l)
    return jnp.einsum("bkgqd->bqkgd", o).astype(qg.dtype), lse

  out_blocks, lse_blocks = lax.map(one_query_block, (jnp.arange(nb), q_blocks))
  return _unblocks(out_blocks), (qg, k, v, se, _unblocks(out_blocks), lse_blocks)


def _flash_bwd(blk, res, g_out):
  qg, k, v, se, out, lse_blocks = res
  g_out, se = _tie(g_out, se)
  q_blocks, k_blocks, v_blocks, se_blocks, do_blocks, o_blocks = (
      _blocks(x, blk) for x in (qg, k, v, se, g_out, out))
  nb = q_blocks.shape[0]
  scale = qg.shape[-1] ** -0.5

  def one_query_block(carry, i):
    dk, dv = carry
    qb, dob = q_blocks[i], do_blocks[i].astype(jnp.float32)
    # delta = rowsum(dO * O), the softmax-Jacobian correction per query.
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", dob, o_blocks[i].astype(jnp.float32))
    lse = lse_blocks[i]

    def step(c, j):
      def compute(c):
        dq, dk, dv = c
        s, mask = _block_scores(qb, k_blocks[j], se_blocks[j], i, j, blk)
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p, dob)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, v_blocks[j].astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blocks[j].astype(jnp.float32))
        dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(jnp.float32))
        dk = lax.dynamic_update_index_in_dim(dk, dk[j] + dk_j, j, 0)
        dv = lax.dynamic_update_index_in_dim(dv, dv[j] + dv_j, j, 0)
        return dq, dk, dv

      return lax.cond(_skip(i, j, se_blocks[j], blk), lambda c: c, compute, c), None

    dq0 = jnp.zeros(qb.shape, jnp.float32)
    (dq, dk, dv), _ = lax.scan(step, (dq0, dk, dv), jnp.arange(nb))
    return (dk, dv), dq

  zeros_kv = jnp.zeros(k_blocks.shape, jnp.float32)
  (dk, dv), dq = lax.scan(one_query_block, (zeros_kv, zeros_kv), jnp.arange(nb))
  return (_unblocks(dq).astype(qg.dtype), _unblocks(dk).astype(k.dtype),
          _unblocks(dv).astype(v.dtype), None)


_flash.defvjp(lambda qg, k, v, se, blk: _flash_fwd(qg, k, v, se, blk), _flash_bwd)
