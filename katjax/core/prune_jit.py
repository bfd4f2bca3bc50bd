"""Jit kernels of entropy pruning over padded node arrays (O(N log N), no Python loops).

Nodes are in pre-order (parent[i] < i, roots have parent -1); padding nodes have
valid = False and are never kept. Loops over tree depth use pointer doubling and stop once
the deepest chain is covered, so they take ceil(log2(depth + 1)) rounds.

- `entropy_priority`: long-term entropy LTE(n) = H(n) + gamma sum_c p(c|n) LTE(c) with
  p(c|n) = b(c) / b(n). Unrolled, b(n) LTE(n) = sum_{d in subtree(n)} gamma^dist(n,d) b(d) H(d):
  round j of the doubling adds the part of the subtree at distance [2^j, 2^(j+1)), read off
  the nodes 2^j below. Priority p(n) LTE(n) / cost(n) with p(n) = b(n) / sum_roots b; rank 1
  on protected nodes and the path to them (a protected node in the subtree) if protect_first.
- `best_first_order`: the exact pop order of a heap-based best-first search from the roots
  by key = (rank, priority, -id) (what `prune.select_reference` does with heapq).
- `select_by_priority`: that order cut at the first node that does not fit the budget; the
  kept set is ancestor-closed since a node is popped only after its parent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.jit
def select_entropy(parent, cost, entropy, branches, protected, valid, budget, gamma,
                   protect_first):
  """bool[N] kept nodes. parent int32[N], cost int32[N], entropy/branches float32[N],
  protected/valid bool[N], budget int32[], gamma float32[], protect_first bool[].
  """
  priority, rank = entropy_priority(parent, cost, entropy, branches, protected, valid, gamma,
                                    protect_first)
  return select_by_priority(parent, cost, priority, rank, valid, budget)


@jax.jit
def select_priority(parent, cost, priority, valid, budget):
  """bool[N] kept nodes, best-first by a given float32[N] priority >= 0 (baselines), rank 0."""
  rank = jnp.where(valid, 0, -1).astype(jnp.int32)
  return select_by_priority(parent, cost, priority, rank, valid, budget)


def entropy_priority(parent, cost, entropy, branches, protected, valid, gamma, protect_first):
  """(priority float32[N], rank int32[N]); see the module docstring. Padding: (0, -1)."""
  n = parent.shape[0]
  idx = jnp.arange(n, dtype=jnp.int32)
  b = jnp.where(valid, branches.astype(jnp.float32), 0.0)
  # Column 0: b H (discounted); column 1: protected count (gamma 1, exact below 2^24).
  x = jnp.stack([b * jnp.where(valid, entropy.astype(jnp.float32), 0.0),
                 (protected & valid).astype(jnp.float32)], axis=1)
  g = jnp.stack([jnp.asarray(gamma, jnp.float32), jnp.float32(1.0)])
  up = jnp.where(parent >= 0, parent, idx)  # roots point at themselves
  has = (parent >= 0) & valid  # the node has an ancestor 2^j above it

  def body(carry):
    x, up, has, g = carry
    x = x + jax.ops.segment_sum(jnp.where(has[:, None], x * g, 0.0), up, n)
    return x, up[up], has & has[up], g * g

  x, _, _, _ = lax.while_loop(lambda c: jnp.any(c[2]), body, (x, up, has, g))
  total = jnp.sum(jnp.where(parent < 0, b, 0.0))
  denom = jnp.maximum(total * cost.astype(jnp.float32), 1e-30)
  priority = jnp.where(valid, x[:, 0] / denom, 0.0)
  rank = jnp.where(protect_first & (x[:, 1] > 0), 1, 0)
  return priority, jnp.where(valid, rank, -1).astype(jnp.int32)


def select_by_priority(parent, cost, priority, rank, valid, budget):
  """bool[N]: the best-first pop order, cut at the first node that does not fit the budget."""
  n = parent.shape[0]
  order = best_first_order(parent, priority, rank)
  cum = _cumsum(cost[order].astype(jnp.int32))
  kept_sorted = (cum <= budget) & valid[order]
  return jnp.zeros(n, bool).at[order].set(kept_sorted)


def best_first_order(parent, priority, rank):
  """int32[N]: node ids in the pop order of a best-first search by key (rank, priority, -id).

  The pop order is the pre-order DFS of the "dominator" tree in which a node hangs under its
  nearest proper ancestor with a smaller key (a virtual root below everything if none), its
  children taken by decreasing key. Why: once the search pops a node, every node of its
  subtree reachable through larger keys beats all other frontier nodes (the popped node beat
  them), so it is popped before the search leaves; streams of sibling subtrees interleave
  only at such records, in key order. Dominators come from binary lifting over path minima;
  DFS positions from dominator-subtree sizes plus sibling offsets (one radix sort).
  priority must be finite and >= 0; N < 2^20.
  """
  n = parent.shape[0]
  m = n + 1  # slots: the nodes and the virtual root n
  if m > 1 << 20:
    raise ValueError(f"best_first_order supports fewer than 2^20 nodes, got {n}")
  root, levels = n, (m - 1).bit_length()  # ids and depths fit in `levels` bits
  idx = jnp.arange(m, dtype=jnp.int32)
  real = idx < n
  fill = lambda a, v: jnp.concatenate([a, jnp.full((m - n,), v, a.dtype)])  # noqa: E731
  # One int32 per node whose signed order is the key order without the id: rank 1 above
  # rank 0 above padding (rank -1) and the virtual root; within a rank the float bits of a
  # priority >= 0 (+ 0.0 turns -0.0 into +0.0). code is the same order read unsigned.
  bits = lax.bitcast_convert_type(fill(priority.astype(jnp.float32), 0.0) + 0.0, jnp.int32)
  r = fill(rank.astype(jnp.int32), -2)  # the virtual root: below every node
  code = jnp.where(r == 1, bits | jnp.int32(-2**31), jnp.where(r == 0, bits + 1, 0))
  key = code ^ jnp.int32(-2**31)
  up0 = jnp.where(real, fill(jnp.where(parent >= 0, parent, root).astype(jnp.int32), 0), root)

  def less(a, ka, b, kb):  # key(a) < key(b), ties: the larger id is smaller
    return (ka < kb) | ((ka == kb) & (a > b))

  # Tables: ups[j] = 2^j-th ancestor, mns[j] = argmin key over ancestors 1..2^j.
  def build(c):
    j, up, mn, mk, ups, mns = c
    ups, mns = ups.at[j].set(up), mns.at[j].set(mn)
    cand, ck = mn[up], mk[up]
    take = less(cand, ck, mn, mk)
    return j + 1, up[up], jnp.where(take, cand, mn), jnp.where(take, ck, mk), ups, mns

  tables = jnp.zeros((levels, m), jnp.int32)
  used, _, _, _, ups, mns = lax.while_loop(  # levels 0..L-1 skip 2^L - 1 >= any depth
      lambda c: (c[0] < levels) & jnp.any(c[1] != root), build,
      (0, up0, up0, key[up0], tables, tables))

  def query(i, cur):  # from the top level down: skip ancestors whose keys are all larger
    j = used - 1 - i
    mn = mns[j][cur]
    return jnp.where(less(mn, key[mn], idx, key), cur, ups[j][cur])

  cur = lax.fori_loop(0, used, query, idx)
  dom = jnp.where(real, up0[cur], root)
  size = _subtree_sum(dom, real.astype(jnp.int32))
  # Siblings by decreasing key: radix sort by (dom, key descending), ties by id.
  sib = _radix_order([(~code, 32), (dom, levels)], m)
  s = size[sib]
  excl = _cumsum(s) - s
  base = jax.ops.segment_min(excl, dom[sib], m)
  offset = jnp.zeros(m, jnp.int32).at[sib].set(excl - base[dom[sib]])
  # DFS position = sum over the dominator chain of (1 + offset), minus 1.
  val, _ = lax.while_loop(lambda c: jnp.any(c[1] != root),
                          lambda c: (c[0] + c[0][c[1]], c[1][c[1]]),
                          (jnp.where(real, 1 + offset, 0), dom))
  return jnp.zeros(n, jnp.int32).at[val[:n] - 1].set(idx[:n])


def _cumsum(x):
  """Inclusive int32 prefix sum; a parallel scan is ~3x faster than jnp.cumsum on XLA:CPU."""
  return lax.associative_scan(jnp.add, x)


def _subtree_sum(up, x):
  """int[M]: sum of x over each node's subtree in the tree given by `up` (root: self loop)."""
  m = up.shape[0]
  has = up != jnp.arange(m)

  def body(c):
    acc, up, has = c
    acc = acc + jax.ops.segment_sum(jnp.where(has, acc, 0), up, m)
    return acc, up[up], has & has[up]

  return lax.while_loop(lambda c: jnp.any(c[2]), body, (x, up, has))[0]


def _radix_order(fields, m):
  """int32[m]: stable order by the unsigned bit fields [(values, width), ...] (last = most
  significant): LSD radix passes of single-operand int32 sorts (XLA's fast CPU sort path;
  sorts carrying a payload are several times slower), each packing a digit above the
  log2(m)-bit position in the current order.
  """
  pos_bits = (m - 1).bit_length()
  width = 31 - pos_bits  # digit bits; the sign bit stays 0
  total = sum(w for _, w in fields)
  pos = jnp.arange(m, dtype=jnp.int32)
  perm = pos
  for lo in range(0, total, width):
    digit = jnp.zeros(m, jnp.int32)
    shift = 0  # bit offset of the current field in the concatenation
    for values, w in fields:
      a, b = max(lo, shift), min(lo + width, shift + w)
      if a < b:  # this field overlaps the digit's bits [lo, lo + width)
        part = (values.astype(jnp.uint32) >> (a - shift)) & ((1 << (b - a)) - 1)
        digit = digit | (part.astype(jnp.int32) << (a - lo))
      shift += w
    packed = lax.sort((digit[perm] << pos_bits) | pos)
    perm = perm[packed & jnp.int32((1 << pos_bits) - 1)]
  return perm
