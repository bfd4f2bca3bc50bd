"""Sequence-parallel (context-parallel) attention over the interval mask: a ring of K/V shards.

A row of T tokens is split into n contiguous shards of C = T / n tokens over the mesh axis
`sequence`; device s holds the queries, keys, values and `subtree_end` of tokens
[s C, (s + 1) C). Under the interval mask (`k <= q < subtree_end[k]`, DESIGN.md section 2)
a query of shard s sees keys of shards <= s only. The K/V shards travel around the ring
(`lax.ppermute` to the next device, inside one `lax.scan` over the n steps): at step r
device s holds the shard of device s - r, computes its queries against it blockwise
(flash-style, blocks of `block` tokens, global token indices in the mask) and merges the
partial result into its running online softmax (o, max, sum). A step whose visiting shard
lies wholly after the device's own (s - r < 0 around the ring) computes nothing.

Ring (ppermute), not all-gather: a device holds its own shard and one visiting shard at a
time, so attention memory is O(T / n) per device instead of O(T): the point of the axis is
a 128k-token row whose keys, values and activations do not fit one device. The price is n
neighbour hops per pass (the forward's last one brings each shard home unused); the causal
structure gives later shards more work (shard n - 1 computes n pairs, shard 0 one), which a
striped token layout would even out (not done here).

The backward pass is a second ring (custom VJP, none of the forward's blocks stored): K/V
travel again with their dK/dV accumulators; each device adds its queries' terms to the
visiting shard's dK/dV and to its own dQ, and the last hop takes the accumulators home.

The rest of the decoder is per token (norms, MLP, RoPE from the `positions` array), so it
runs on each shard as it is; the tree loss's parent gather (`head_logprobs`) crosses shard
boundaries only where a node's first token has its parent on an earlier shard, and the
compiler's sharding propagation handles that.
Shapes: q float[B, T, H, D]; k, v float[B, T, KV, D]; subtree_end int[B, T]; T % n == 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

_NEG = -1e30
AXIS = "sequence"  # the mesh axis (katjax.parallel.rules.MESH_AXES) this kernel runs over


def sequence_size(mesh) -> int:
  """Size of the mesh's `sequence` axis (1 when there is no mesh or no such axis)."""
  if mesh is None or AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[AXIS])


def ring_attention(q, k, v, subtree_end, *, mesh, block: int = 512):
  """Attention of a row sharded over the mesh's `sequence` axis. out float[B, T, H, D].

  Callable on global arrays inside `jax.jit`: a `jax.shard_map` manual over `sequence` only
  (the batch and head dims stay under the compiler's automatic sharding for the other axes).
  """
  n = sequence_size(mesh)
  b, t, h, d = q.shape
  if t % n:
    raise ValueError(f"sequence parallelism: the row length {t} is not divisible by the "
                     f"mesh's sequence axis of size {n}; make the row a multiple of {n}")
  c = t // n
  blk = min(block, c)
  if c % blk:
    blk = math.gcd(c, blk)  # blocks must tile each shard; a ragged shard gets smaller ones
  kv = k.shape[2]
  spec = P(None, AXIS)
  fn = jax.shard_map(functools.partial(_local, n=n, blk=blk), mesh=mesh,
                     in_specs=(spec, spec, spec, spec), out_specs=spec, axis_names={AXIS},
                     check_vma=False)
  qg = q.reshape(b, t, kv, h // kv, d)
  out = fn(qg, k, v, subtree_end.astype(jnp.int32))
  return out.reshape(b, t, h, d)


def _local(qg, k, v, se, *, n, blk):
  return _ring(qg, k, v, se, n, blk)


# --- the ring, forward and backward ------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(qg, k, v, se, n, blk):
  return _ring_fwd(qg, k, v, se, n, blk)[0]


def _shift(x, n):
  """Send to the next device of the ring (s -> s + 1)."""
  return lax.ppermute(x, AXIS, perm=[(j, (j + 1) % n) for j in range(n)])


def _ring_fwd(qg, k, v, se, n, blk):
  # Tie the loop-invariant mask to q (see attention._tie): masks stay inside the loops.
  qg, se = lax.optimization_barrier((qg, se))
  b, c, kv, g, d = qg.shape
  me = lax.axis_index(AXIS)
  nq = c // blk
  q_blocks = _blocks(qg, blk)
  carry = (jnp.zeros((nq, b, kv, g, blk, d), jnp.float32),
           jnp.full((nq, b, kv, g, blk), _NEG, jnp.float32),
           jnp.zeros((nq, b, kv, g, blk), jnp.float32))

  def ring_step(state, r):
    carry, held = state
    src = (me - r) % n  # whose shard this device holds at step r

    def pair(carry):
      kb, vb, seb = (_blocks(x, blk) for x in held)
      return _pair_fwd(q_blocks, kb, vb, seb, me * c, src * c, carry, blk)

    carry = lax.cond(src > me, lambda cr: cr, pair, carry)
    return (carry, _shift(held, n)), None

  (carry, _), _ = lax.scan(ring_step, (carry, (k, v, se)), jnp.arange(n))
  o, m, l = carry
  l = jnp.maximum(l, 1e-30)
  lse = m + jnp.log(l)
  out = _unblocks(jnp.einsum("nbkgqd->nbqkgd", o / l[..., None])).astype(qg.dtype)
  return out, (qg, k, v, se, out, lse)


def _ring_bwd(n, blk, res, g_out):
  qg, k, v, se, out, lse = res
  g_out, se = lax.optimization_barrier((g_out, se))
  c = qg.shape[1]
  me = lax.axis_index(AXIS)
  f32 = jnp.float32
  q_blocks, do_blocks = _blocks(qg, blk), _blocks(g_out.astype(f32), blk)
  # delta = rowsum(dO * O), the softmax-Jacobian correction per query: [nq, B, KV, G, blk].
  delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", do_blocks, _blocks(out.astype(f32), blk))

  def ring_step(state, r):
    dq, held = state
    src = (me - r) % n

    def pair(acc):
      dq, dk, dv = acc
      kb, vb, seb = (_blocks(x, blk) for x in held[:3])
      dq, dkb, dvb = _pair_bwd(q_blocks, do_blocks, lse, delta, kb, vb, seb, me * c, src * c,
                               dq, _blocks(dk, blk), _blocks(dv, blk), blk)
      return dq, _unblocks(dkb), _unblocks(dvb)

    dq, dk, dv = lax.cond(src > me, lambda a: a, pair, (dq, held[3], held[4]))
    # After the last step this hop takes each shard's dK/dV home (it came from me + 1).
    return (dq, _shift(held[:3] + (dk, dv), n)), None

  held = (k, v, se, jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
  (dq, held), _ = lax.scan(ring_step, (jnp.zeros(q_blocks.shape, f32), held), jnp.arange(n))
  dk, dv = held[3:]
  return (_unblocks(dq).astype(qg.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


_ring.defvjp(_ring_fwd, _ring_bwd)


# --- one (query shard, key shard) pair, blockwise ----------------------------------------


def _pair_fwd(q_blocks, k_blocks, v_blocks, se_blocks, q_off, k_off, carry, blk):
  """Merge the local queries' attention to one key shard into (o, m, l), block by block."""
  nk = k_blocks.shape[0]

  def one_query_block(args):
    i, qb, o, m, l = args
    q_start = q_off + i * blk

    def step(c, j):
      k_start = k_off + j * blk

      def compute(c):
        o, m, l = c
        s, mask = _scores(qb, k_blocks[j], se_blocks[j], q_start, k_start, blk)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blocks.dtype), v_blocks[j],
                        preferred_element_type=jnp.float32)
        return o * corr[..., None] + pv, m_new, l * corr + p.sum(-1)

      return lax.cond(_skip(q_start, k_start, se_blocks[j], blk), lambda x: x, compute,
                      c), None

    return lax.scan(step, (o, m, l), jnp.arange(nk))[0]

  o, m, l = carry
  return lax.map(one_query_block, (jnp.arange(q_blocks.shape[0]), q_blocks, o, m, l))


def _pair_bwd(q_blocks, do_blocks, lse, delta, k_blocks, v_blocks, se_blocks, q_off, k_off,
              dq, dk, dv, blk):
  """Add one key shard's terms to dQ (local queries) and to that shard's dK, dV."""
  nk = k_blocks.shape[0]
  f32 = jnp.float32
  scale = q_blocks.shape[-1] ** -0.5

  def one_query_block(carry, xs):
    dk, dv = carry
    i, qb, dob, lse_i, delta_i, dq_i = xs
    q_start = q_off + i * blk

    def step(c, j):
      k_start = k_off + j * blk

      def compute(c):
        dq_i, dk, dv = c
        s, mask = _scores(qb, k_blocks[j], se_blocks[j], q_start, k_start, blk)
        p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
        dv_j = jnp.einsum("bkgqs,bqkgd->bskd", p, dob)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, v_blocks[j].astype(f32))
        ds = p * (dp - delta_i[..., None]) * scale
        dq_i = dq_i + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blocks[j].astype(f32))
        dk_j = jnp.einsum("bkgqs,bqkgd->bskd", ds, qb.astype(f32))
        dk = lax.dynamic_update_index_in_dim(dk, dk[j] + dk_j, j, 0)
        dv = lax.dynamic_update_index_in_dim(dv, dv[j] + dv_j, j, 0)
        return dq_i, dk, dv

      return lax.cond(_skip(q_start, k_start, se_blocks[j], blk), lambda x: x, compute,
                      c), None

    (dq_i, dk, dv), _ = lax.scan(step, (dq_i, dk, dv), jnp.arange(nk))
    return (dk, dv), dq_i

  xs = (jnp.arange(q_blocks.shape[0]), q_blocks, do_blocks, lse, delta, dq)
  (dk, dv), dq = lax.scan(one_query_block, (dk, dv), xs)
  return dq, dk, dv


def _scores(qb, kb, se_b, q_start, k_start, blk):
  """Scores float32[B, KV, G, bq, bk] of one block pair at global offsets, and the mask."""
  d = qb.shape[-1]
  s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * d ** -0.5
  q_idx = q_start + jnp.arange(blk, dtype=jnp.int32)
  k_idx = k_start + jnp.arange(blk, dtype=jnp.int32)
  # attention.visible's rule, k <= q < subtree_end[k], at global indices: [B, bq, bk].
  mask = (k_idx[None, None, :] <= q_idx[None, :, None]) & (q_idx[None, :, None] < se_b[:, None, :])
  mask = mask[:, None, None]
  return jnp.where(mask, s, _NEG), mask


def _skip(q_start, k_start, se_b, blk):
  """True when no query of the block can see any key of the block (whole local batch)."""
  return (k_start > q_start + blk - 1) | (jnp.max(se_b) <= q_start)


def _blocks(x, blk):
  """[B, C, ...] -> [C/blk, B, blk, ...]."""
  b, c = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, c // blk, blk, *x.shape[2:]), 1, 0)


def _unblocks(x):
  n, b, blk = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * blk, *x.shape[3:])
