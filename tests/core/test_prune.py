"""Entropy pruning (katjax/core/prune.py): jit == heapq reference, budget, closure, baselines.

Priorities are checked against a brute-force closed form (ancestor walks), the pruned tree's
weights against flat per-branch sums over the kept prefixes.
"""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from katjax.testing.trees import random_group, realistic_groups
from katjax.core import prune, prune_jit
from katjax.core.fields import TOOL_CALL, TOOL_RESULT
from katjax.core.tree import Trajectory, build_tree

SETTINGS = settings(max_examples=300, deadline=None)
ENTROPY_PRIORITY = jax.jit(prune_jit.entropy_priority)  # one compile (arrays padded to 32)
CONFIGS = [prune.PruneConfig(gamma=g, protect_first=pf, selector=s, seed=7)
           for s in prune.SELECTORS for g, pf in ((0.9, True), (0.5, False), (1.0, True))]


def random_nodes(seed: int, n_max: int = 60):
  """A random pre-order forest with ties (zero entropies, repeated costs), chains, protected
  nodes and varied branch counts. Returns (Nodes, budget)."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, n_max))
  parent, stack = [], []
  for i in range(n):
    if not stack or rng.random() < 0.08:  # a new root: forests happen
      stack = [i]
      parent.append(-1)
      continue
    deep = rng.random() < 0.6  # chains: hang under the last node
    k = len(stack) - 1 if deep else int(rng.integers(0, len(stack)))
    stack = stack[:k + 1]
    parent.append(stack[-1])
    stack.append(i)
  cost = rng.choice([1, 2, 5, 40], n) if rng.random() < 0.5 else rng.integers(1, 300, n)
  ent = np.where(rng.random(n) < 0.3, 0.0, rng.exponential(3.0, n))
  nodes, _ = prune.make_nodes(parent, cost, ent, rng.integers(1, 9, n), rng.random(n) < 0.1,
                              rng.exponential(1.0, n))
  total = int(cost.sum())
  budget = int(rng.integers(1, total + 10))
  return nodes, budget


def closure_ok(nodes, kept):
  par = nodes.parent
  return not np.any(kept & (par >= 0) & ~kept[np.maximum(par, 0)])


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_jit_equals_reference_budget_closure_determinism(seed):
  nodes, budget = random_nodes(seed)
  roots_fit = budget >= nodes.cost[nodes.parent < 0].max()
  cfg = CONFIGS[seed % len(CONFIGS)]
  try:
    ref = prune.select_reference(nodes, budget, cfg)
  except ValueError as e:
    assert "is smaller than" in str(e) and not roots_fit
    with pytest.raises(ValueError, match="is smaller than"):
      prune.select(nodes, budget, cfg)
    return
  got = prune.select(nodes, budget, cfg)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(prune.select(nodes, budget, cfg), got)  # deterministic
  assert nodes.cost[got].sum() <= budget
  assert closure_ok(nodes, got)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_priorities_match_closed_form(seed, gamma):
  """LTE(n) = sum over descendants d of gamma^dist * b(d)/b(n) * H(d), by ancestor walks."""
  nodes, _ = random_nodes(seed, 30)
  n = nodes.parent.size
  b, h = nodes.branches.astype(np.float64), nodes.entropy.astype(np.float64)
  lte = np.zeros(n)
  for d in range(n):
    a, dist = d, 0
    while a >= 0:
      lte[a] += gamma**dist * b[d] / b[a] * h[d]
      a, dist = int(nodes.parent[a]), dist + 1
  want = b / b[nodes.parent < 0].sum() * lte / nodes.cost
  np.testing.assert_allclose(prune.priorities(nodes, gamma), want, rtol=1e-9, atol=1e-12)
  pad = lambda a, v: np.concatenate([a, np.full(32 - n, v, a.dtype)])  # noqa: E731
  got, _ = ENTROPY_PRIORITY(pad(nodes.parent, -1), pad(nodes.cost, 1), pad(nodes.entropy, 0),
                            pad(nodes.branches, 1), pad(nodes.protected, False),
                            pad(np.ones(n, bool), False), np.float32(gamma), True)
  got = np.asarray(got)[:n]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_protected_kept_when_their_closure_fits(seed):
  nodes, _ = random_nodes(seed)
  need = nodes.protected.copy()
  for i in range(nodes.parent.size - 1, -1, -1):  # ancestors of protected nodes
    if need[i] and nodes.parent[i] >= 0:
      need[nodes.parent[i]] = True
  budget = max(int(nodes.cost[need].sum()), int(nodes.cost[nodes.parent < 0].max()))
  kept = prune.select(nodes, budget, prune.PruneConfig(protect_first=True))
  assert kept[nodes.protected].all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_budget_at_least_tree_size_keeps_everything(seed):
  nodes, _ = random_nodes(seed)
  for cfg in CONFIGS[::3]:
    total = int(nodes.cost.sum())
    assert prune.select(nodes, total, cfg).all()
    assert prune.select_reference(nodes, total + 5, cfg).all()


def test_jit_equals_reference_large_and_deep():
  """Many doubling levels: a 2000-node chain and a 2000-node branching tree (one padded
  size, so two compiles)."""
  from katjax.testing.trees import random_tree
  rng = np.random.default_rng(5)
  chain, _ = prune.make_nodes(np.arange(2000) - 1, rng.integers(1, 50, 2000),
                              rng.exponential(1.0, 2000), protected=rng.random(2000) < 0.01)
  for nodes in (chain, random_tree(2000, seed=3)):
    for cfg in (CONFIGS[0], CONFIGS[4], CONFIGS[7]):
      for frac in (0.3, 0.8):
        b = int(frac * nodes.cost.sum())
        np.testing.assert_array_equal(prune.select(nodes, b, cfg),
                                      prune.select_reference(nodes, b, cfg))


def test_baselines_mean_what_they_say():
  """truncation = every branch cut at one common length; random = seeded and reproducible."""
  # root(3) -> a(4) -> b(4); root -> c(2) -> d(9). Ends: a 7, b 11, c 5, d 14.
  nodes, _ = prune.make_nodes([-1, 0, 1, 0, 3], [3, 4, 4, 2, 9], np.ones(5))
  trunc = prune.PruneConfig(selector="truncation")
  np.testing.assert_array_equal(prune.select(nodes, 9, trunc), [1, 1, 0, 1, 0])  # 3+2+4
  np.testing.assert_array_equal(prune.select(nodes, 13, trunc), [1, 1, 1, 1, 0])
  rnd = [prune.select(nodes, 9, prune.PruneConfig(selector="random", seed=s)) for s in (1, 1)]
  np.testing.assert_array_equal(rnd[0], rnd[1])


def test_bad_input():
  nodes, _ = prune.make_nodes([-1, 0], [10, 5], [1.0, 2.0])
  for fn in (prune.select, prune.select_reference):
    with pytest.raises(ValueError, match="smaller than the root node"):
      fn(nodes, 9)
    with pytest.raises(ValueError, match="budget"):
      fn(nodes, 3.5)
  with pytest.raises(ValueError, match="pre-order"):
    prune.make_nodes([-1, 2, 0], [1, 1, 1], [0, 0, 0])
  with pytest.raises(ValueError, match="at least 1 token"):
    prune.make_nodes([-1, 0], [1, 0], [0, 0])
  with pytest.raises(ValueError, match="selector"):
    prune.PruneConfig(selector="best")
  # NaN / inf entropies count and act as 0.
  bad, count = prune.make_nodes([-1, 0, 0, 1], [2, 3, 3, 3], [1.0, np.nan, 2.0, np.inf])
  assert count == 2
  clean, _ = prune.make_nodes([-1, 0, 0, 1], [2, 3, 3, 3], [1.0, 0.0, 2.0, 0.0])
  np.testing.assert_array_equal(bad.entropy, clean.entropy)
  for b in range(2, 12):
    np.testing.assert_array_equal(prune.select(bad, b), prune.select(clean, b))


# --- tree level ---------------------------------------------------------------------------


def flat_weights(trajs, kept_len):
  """Flat per-branch sums over the kept prefixes (token-mean): sum P, sum N, sum K."""
  pos = neg = kl = 0.0
  for t, k in zip(trajs, kept_len):
    m = float(t.loss_mask[:k].sum())
    pos += max(t.advantage, 0.0) * m
    neg += min(t.advantage, 0.0) * m
    kl += m
  return pos, neg, kl


@pytest.fixture(scope="module")
def realistic():
  return [build_tree(g) for g in realistic_groups(2, seed=3)]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 1.1))
def test_prune_tree_recomputes_weights_over_kept_tokens(seed, frac):
  rng = np.random.default_rng(seed)
  trajs = random_group(rng, branches=int(rng.integers(1, 7)))
  tree = build_tree(trajs)
  budget = max(int(frac * tree.num_tokens), 1)
  try:
    pruned, info = prune.prune_tree(tree, budget, prune.PruneConfig(max_node_tokens=3))
  except ValueError as e:
    assert "smaller than the root" in str(e)
    return
  assert pruned.num_tokens == info["kept_tokens"] <= budget
  kept_len = np.zeros(len(trajs), int)
  for b, t in zip(pruned.branch_ids, pruned.trajectories()):  # each kept branch: a prefix
    orig = trajs[b]
    np.testing.assert_array_equal(t.tokens, orig.tokens[:len(t)])
    np.testing.assert_array_equal(t.loss_mask, orig.loss_mask[:len(t)])
    kept_len[b] = len(t)
  w = pruned.token_weights("token-mean")
  want = flat_weights(trajs, kept_len)
  got = (w["pos_weight"].sum(), w["neg_weight"].sum(), w["kl_weight"].sum())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_node_stats_splits_turns(realistic):
  tree = realistic[0]
  nodes, split = prune.node_stats(tree)
  assert nodes.parent.size > tree.num_nodes
  assert split["length"].sum() == tree.num_tokens
  trainable = tree.branch_mask.any(axis=0)
  for s, n in zip(split["start"], split["length"]):  # one kind of turn per piece
    assert len(set(trainable[s:s + n])) == 1
    assert len(set((tree.flags[s:s + n] & TOOL_RESULT) != 0)) == 1
  np.testing.assert_allclose(nodes.entropy.sum(), tree.entropy[trainable].sum(), rtol=1e-5)
  w = tree.token_weights()
  want = np.sum(tree.entropy * (np.abs(w["pos_weight"]) + np.abs(w["neg_weight"])))
  np.testing.assert_allclose(nodes.signal.sum(), want, rtol=1e-5)
  capped, split2 = prune.node_stats(tree, prune.PruneConfig(max_node_tokens=64))
  assert split2["length"].max() <= 64
  for cfg in CONFIGS[::2]:  # jit == reference on a realistic tree too
    b = tree.num_tokens // 2
    np.testing.assert_array_equal(prune.select(capped, b, cfg),
                                  prune.select_reference(capped, b, cfg))


def test_entropy_beats_baselines_at_half_budget(realistic):
  got = {}
  for s in prune.SELECTORS:
    kept = total = 0.0
    for tree in realistic:
      nodes, _ = prune.node_stats(tree)
      k = prune.select(nodes, tree.num_tokens // 2, prune.PruneConfig(selector=s))
      kept, total = kept + nodes.signal[k].sum(), total + nodes.signal.sum()
    got[s] = kept / total
  assert got["entropy"] > got["truncation"] + 0.05 and got["entropy"] > got["random"] + 0.1


def test_prune_groups_joint_budget(realistic):
  budget = sum(t.num_tokens for t in realistic) // 3
  trees, info = prune.prune_groups(realistic, budget)
  assert sum(t.num_tokens for t in trees) == info["kept_tokens"] <= budget
  assert 0 < info["retained_signal"] < 1 and not info["dropped_groups"]
  same, info2 = prune.prune_groups(realistic, 10**7)
  assert info2["kept_tokens"] == info2["tokens"] == sum(t.num_tokens for t in realistic)
  assert all(a.num_tokens == b.num_tokens for a, b in zip(same, realistic))


def test_prune_batch_fits_fixed_rows(realistic):
  row = 8192  # smaller than either tree: each is pruned to a row first
  assert all(t.num_tokens > row for t in realistic)
  batch, info = prune.prune_batch(realistic, 2, row)
  assert batch.tokens.shape == (2, row)
  assert batch.tree_tokens == info["kept_tokens"] <= 2 * row
  assert info["kept_tokens"] > 0.9 * 2 * row  # the budget is used, not wasted


def test_tree_nan_entropy_and_single_branch():
  rng = np.random.default_rng(0)
  n = 40
  mask = np.r_[np.zeros(10), np.ones(30)].astype(np.int8)
  flags = np.zeros(n, np.int32)
  flags[15:20] = TOOL_CALL
  traj = Trajectory(tokens=rng.integers(0, 50, n), loss_mask=mask,
                    entropy=rng.random(n).astype(np.float32), flags=flags, advantage=1.0)
  tree = build_tree([traj])  # a single branch: one node
  tree.entropy[[12, 30]] = np.nan  # as if a sampler produced NaN after validation
  nodes, split = prune.node_stats(tree)
  assert split["nan_entropies"] == 2 and np.isfinite(nodes.entropy).all()
  pruned, info = prune.prune_tree(tree, 25)
  assert info["nan_entropies"] == 2 and pruned.num_tokens <= 25
  assert np.isfinite(pruned.entropy).all()
  np.testing.assert_array_equal(pruned.tokens, traj.tokens[:pruned.num_tokens])
  assert math.isclose(float(pruned.token_weights()["kl_weight"].sum()),
                      float(mask[:pruned.num_tokens].sum()))
  with pytest.raises(ValueError, match="smaller than the root"):
    prune.prune_tree(tree, 5)
