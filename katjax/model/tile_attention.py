"""Tile-list attention: only the (query block, key block) tiles the interval mask touches.

`blockwise_attention` walks every key block for every query block and skips the closed ones
with `lax.cond`: its loop is bounded by the row length, and at one block size for every
row, a bushy tree's tiles are mostly masked. Here the host lists, per row, the tiles that
hold at least one visible pair (`attention_tiles`), and one `lax.scan` over the listed tiles
of all rows runs the flash forward and the recomputing backward (dq, dk, dv in the same
pass). The work is the listed tiles, spread evenly over one loop: no tile loop is bounded by
the worst row or the worst query block (padding entries of the list are masked no-ops).

Which tiles are visible follows from the pre-order layout: the keys of block kj are seen by
queries from their own position up to `subtree_end`, so block kj is seen by the query blocks
kj .. (max over its keys of subtree_end - 1) // block, one contiguous run per key block.
`choose_block` picks the block size per batch from a cost model (masked pairs computed
against a per-tile overhead), `tile_stats` reports the attention efficiency: visible pairs
over computed pairs.

Shapes: q float[B, T, H, D]; k, v float[B, T, KV, D]; subtree_end int[B, T]; tiles
int32[B, N, 2] of (query block, key block), -1 for padding entries; T % block == 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NEG = -1e30
# Block sizes the kernel may be given (all covered by the tests). 512 is left out: on CPU its
# score tiles (4 MB of float32 per head pair) leave the caches and cost more per pair.
BLOCKS = (64, 128, 256)
# Per-tile overhead in pair-equivalents for the cost model (loop step, slicing, updates),
# fitted to the kernel's step times at the three block sizes on CPU.
TILE_OVERHEAD_PAIRS = 6144


def attention_tiles(subtree_end, block: int, length: int | None = None) -> np.ndarray:
  """Host-side tile list int32[B, N, 2] of (query block, key block), sorted, -1 padded.

  N = the largest count over rows, or `length` (>= it) to keep shapes stable across batches.
  """
  se = np.asarray(subtree_end)
  b, t = se.shape
  if t % block:
    raise ValueError(f"attention_tiles: row length {t} is not a multiple of block {block}")
  per_row = [_row_tiles(se[r], block) for r in range(b)]
  n = max(len(x) for x in per_row)
  if length is not None:
    if length < n:
      raise ValueError(f"attention_tiles: length={length} < {n} tiles needed")
    n = length
  out = np.full((b, n, 2), -1, np.int32)
  for r, x in enumerate(per_row):
    out[r, :len(x)] = x
  return out


def tile_stats(subtree_end, block: int) -> dict:
  """Visible pairs, computed pairs (listed tiles x block^2) and their ratio, the efficiency."""
  se = np.asarray(subtree_end, np.int64)
  t = se.shape[1]
  visible = float(np.sum(se - np.arange(t)))
  tiles = sum(len(_row_tiles(row, block)) for row in se)
  computed = float(tiles) * block * block
  return {"visible_pairs": visible, "computed_pairs": computed, "tiles": tiles,
          "efficiency": visible / computed}


def choose_block(subtree_end, blocks=BLOCKS, overhead=TILE_OVERHEAD_PAIRS) -> int:
  """The block size (dividing the row length) with the least modelled cost:
  tiles x (block^2 + overhead)."""
  t = np.asarray(subtree_end).shape[1]
  fits = [b for b in blocks if t % b == 0]
  if not fits:
    raise ValueError(f"choose_block: row length {t} is a multiple of none of {blocks}")
  cost = {b: tile_stats(subtree_end, b)["tiles"] * (b * b + overhead) for b in fits}
  return min(fits, key=lambda b: (cost[b], -b))


def tile_attention(q, k, v, subtree_end, tiles, *, block: int):
  """Flash attention over the listed tiles. out float[B, T, H, D] (see the module doc)."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  if t % block:
    raise ValueError(f"tile_attention: row length {t} is not a multiple of block {block}")
  qg = q.reshape(b, t // block, block, kv, h // kv, d)
  kb, vb = (x.reshape(b, t // block, block, kv, d) for x in (k, v))
  seb = subtree_end.astype(jnp.int32).reshape(b, t // block, block)
  out = _tiles(qg, kb, vb, seb, tiles.astype(jnp.int32), block)
  return out.reshape(b, t, h, d)


def _row_tiles(se_row, block):
  """[(qi, kj)] of one row, sorted by query block then key block."""
  nb = se_row.size // block
  last = (se_row.reshape(nb, block).max(axis=1) - 1) // block  # last query block seeing kj
  pairs = [(qi, kj) for kj in range(nb) for qi in range(kj, int(last[kj]) + 1)]
  return sorted(pairs)


def _entries(tiles):
  """[B, N, 2] -> (row, qi, kj, valid) [B * N] each; padding becomes tile (0, 0) of its row
  with valid = False, which masks every pair: an exact no-op update. (A `lax.cond` around
  the step instead makes XLA copy the whole carry on every step.)"""
  b, n, _ = tiles.shape
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, n)).reshape(-1)
  qi, kj = tiles[..., 0].reshape(-1), tiles[..., 1].reshape(-1)
  valid = qi >= 0
  return rows, jnp.maximum(qi, 0), jnp.maximum(kj, 0), valid


def _scores(qb, kb, se_b, qi, kj, valid, block):
  """Scores float32[KV, G, bq, bk] of one tile and its mask bool[1, 1, bq, bk]."""
  d = qb.shape[-1]
  s = jnp.einsum("qkgd,skd->kgqs", qb, kb, preferred_element_type=jnp.float32) * d ** -0.5
  q_idx = qi * block + jnp.arange(block, dtype=jnp.int32)
  k_idx = kj * block + jnp.arange(block, dtype=jnp.int32)
  mask = (k_idx[None, :] <= q_idx[:, None]) & (q_idx[:, None] < se_b[None, :]) & valid
  return jnp.where(mask[None, None], s, _NEG), mask[None, None]


def _get(x, r, i):
  return lax.dynamic_index_in_dim(lax.dynamic_index_in_dim(x, r, 0, False), i, 0, False)


def _put(x, r, i, val):
  return lax.dynamic_update_slice(x, val[None, None].astype(x.dtype),
                                  (r, i) + (0,) * (x.ndim - 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tiles(qg, kb, vb, seb, tiles, block):
  return _tiles_fwd(qg, kb, vb, seb, tiles, block)[0]


def _tiles_fwd(qg, kb, vb, seb, tiles, block):
  # Tie the loop-invariant mask inputs to q (see attention._tie): the per-tile masks stay
  # inside the loop instead of being hoisted and stored for all tiles at once.
  qg, seb, tiles = lax.optimization_barrier((qg, seb, tiles))
  b, nb, blk, kv, g, d = qg.shape
  entries = _entries(tiles)

  def step(carry, e):
    r, qi, kj, valid = e
    o, m, l = carry
    s, mask = _scores(_get(qg, r, qi), _get(kb, r, kj), _get(seb, r, kj), qi, kj, valid, block)
    m_old, l_old, o_old = _get(m, r, qi), _get(l, r, qi), _get(o, r, qi)
    m_new = jnp.maximum(m_old, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m_old - m_new)
    pv = jnp.einsum("kgqs,skd->kgqd", p.astype(vb.dtype), _get(vb, r, kj),
                    preferred_element_type=jnp.float32)
    return (_put(o, r, qi, o_old * corr[..., None] + pv), _put(m, r, qi, m_new),
            _put(l, r, qi, l_old * corr + p.sum(-1))), None

  init = (jnp.zeros((b, nb, kv, g, blk, d), jnp.float32),
          jnp.full((b, nb, kv, g, blk), _NEG, jnp.float32),
          jnp.zeros((b, nb, kv, g, blk), jnp.float32))
  (o, m, l), _ = lax.scan(step, init, entries)
  l = jnp.maximum(l, 1e-30)
  lse = m + jnp.log(l)
  out = jnp.einsum("bnkgqd->bnqkgd", o / l[..., None]).astype(qg.dtype)
  return out, (qg, kb, vb, seb, tiles, out, lse)


def _tiles_bwd(block, res, g_out):
  qg, kb, vb, seb, tiles, out, lse = res
  g_out, seb, tiles = lax.optimization_barrier((g_out, seb, tiles))
  scale = qg.shape[-1] ** -0.5
  entries = _entries(tiles)
  f32 = jnp.float32
  # delta = rowsum(dO * O), the softmax-Jacobian correction per query: [B, nb, KV, G, blk].
  delta = jnp.einsum("bnqkgd,bnqkgd->bnkgq", g_out.astype(f32), out.astype(f32))

  def step(carry, e):
    r, qi, kj, valid = e
    dq, dk, dv = carry
    qb, kbj, vbj = _get(qg, r, qi), _get(kb, r, kj), _get(vb, r, kj)
    dob = _get(g_out, r, qi).astype(f32)
    s, mask = _scores(qb, kbj, _get(seb, r, kj), qi, kj, valid, block)
    p = jnp.where(mask, jnp.exp(s - _get(lse, r, qi)[..., None]), 0.0)
    dv_j = jnp.einsum("kgqs,qkgd->skd", p, dob)
    dp = jnp.einsum("qkgd,skd->kgqs", dob, vbj.astype(f32))
    ds = p * (dp - _get(delta, r, qi)[..., None]) * scale
    dq_i = jnp.einsum("kgqs,skd->qkgd", ds, kbj.astype(f32))
    dk_j = jnp.einsum("kgqs,qkgd->skd", ds, qb.astype(f32))
    return (_put(dq, r, qi, _get(dq, r, qi) + dq_i), _put(dk, r, kj, _get(dk, r, kj) + dk_j),
            _put(dv, r, kj, _get(dv, r, kj) + dv_j)), None

  init = (jnp.zeros(qg.shape, f32), jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32))
  (dq, dk, dv), _ = lax.scan(step, init, entries)
  return (dq.astype(qg.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, None)


_tiles.defvjp(_tiles_fwd, _tiles_bwd)
