"""Prefix trees: round trips (tree and packed batch), layout invariants, pruning, bad input.

Invariants are checked against the definitions on the flat trajectories (a token's
ancestors are its linear prefix), not against the builder's own bookkeeping.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from katjax.testing.trees import random_group, realistic_groups
from katjax.core.tree import Trajectory, build_tree
from katjax.core.tree_pack import pack_trees, unpack

SETTINGS = settings(max_examples=25, deadline=None)


def _groups(seed, n_groups=3):
  rng = np.random.default_rng(seed)
  return [random_group(rng, branches=int(rng.integers(1, 7)), group_id=g)
          for g in range(n_groups)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.equals(y), (x, y)


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_tree_round_trip_and_layout(seed):
  group = _groups(seed, 1)[0]
  tree = build_tree(group)
  _same(tree.trajectories(), group)
  assert tree.flat_tokens == sum(len(t) for t in group)
  # The tree holds each distinct (context, token) once: count distinct keyed prefixes.
  keys = set()
  for t in group:
    for i in range(len(t)):
      keys.add(tuple((int(t.tokens[j]), float(t.logprobs[j]), float(t.entropy[j]),
                      int(t.flags[j])) for j in range(i + 1)))
  assert tree.num_tokens == len(keys)
  for b, t in enumerate(group):
    path = _ancestors(tree, int(tree.branch_end[b]))
    np.testing.assert_array_equal(tree.tokens[path], t.tokens)
    # Depth positions are the linear positions; the parent is the previous path token.
    np.testing.assert_array_equal(tree.positions[path], np.arange(len(t)))
    np.testing.assert_array_equal(tree.parent[path], np.concatenate([[-1], path[:-1]]))
  # Attention interval == "key is an ancestor-or-self of the query".
  t_len = tree.num_tokens
  for q in range(t_len):
    anc = set(_ancestors(tree, q).tolist())
    for k in range(t_len):
      assert (k <= q < tree.subtree_end[k]) == (k in anc)
  # Node view: contiguous spans, members = branches whose path covers the node.
  for n in range(tree.num_nodes):
    s, ln = tree.node_start[n], tree.node_len[n]
    assert ln >= 1 and np.all(tree.node_of[s:s + ln] == n)
    through = [b for b in range(len(group))
               if s in _ancestors(tree, int(tree.branch_end[b]))]
    np.testing.assert_array_equal(tree.node_branches(n), through)
    if tree.node_parent[n] >= 0:
      assert tree.parent[s] == tree.node_start[tree.node_parent[n]] + \
          tree.node_len[tree.node_parent[n]] - 1
  # Compression: a node with exactly one child has a branch ending in it.
  for n in range(tree.num_nodes):
    kids = np.flatnonzero(tree.node_parent == n)
    if kids.size == 1:
      assert np.any(tree.branch_end == tree.node_start[n] + tree.node_len[n] - 1)


def _ancestors(tree, i):
  return _ancestors_row(tree.parent, i)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([40, 64, 200]))
def test_pack_unpack_round_trip(seed, max_tokens):
  groups = _groups(seed, 4)
  trees = [build_tree(g) for g in groups]
  if max(t.num_tokens for t in trees) > max_tokens:
    with pytest.raises(ValueError, match="max_tokens"):
      pack_trees(trees, max_tokens)
    return
  batch = pack_trees(trees, max_tokens, norm="seq-mean-token-mean")
  _same(unpack(batch), [t for g in groups for t in g])
  assert batch.flat_tokens == sum(len(t) for g in groups for t in g)
  assert batch.tree_tokens == sum(t.num_tokens for t in trees)
  r, s = batch.tokens.shape
  idx = np.arange(s)
  assert np.all(batch.subtree_end > idx) and np.all(batch.subtree_end <= s)
  pad = batch.mult == 0
  assert np.all(batch.subtree_end[pad] == np.broadcast_to(idx + 1, (r, s))[pad])
  for k in ("pos_weight", "neg_weight", "kl_weight", "count", "denom"):
    assert np.all(batch.arrays()[k][pad] == 0)
  # No tree straddles rows and no two trees overlap.
  used = np.zeros((r, s), int)
  for tree, row, off in zip(trees, batch.tree_row, batch.tree_offset):
    used[row, off:off + tree.num_tokens] += 1
  assert used.max() <= 1 and np.array_equal(used > 0, ~pad)


def test_token_weights_match_flat_sums():
  group = _groups(7, 1)[0] + _groups(8, 1)[0]
  tree = build_tree(group)
  for norm in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
    w = tree.token_weights(norm)
    # Flat: each branch's masked tokens carry w_b * A_b; summed over all tokens == tree sum.
    lens = np.array([t.loss_mask.sum() for t in group], float)
    wb = 1.0 / np.maximum(lens, 1) if norm == "seq-mean-token-mean" else np.ones(len(group))
    adv = np.array([t.advantage for t in group])
    np.testing.assert_allclose(w["pos_weight"].sum(), np.sum(wb * lens * adv * (adv > 0)),
                               rtol=1e-5)
    np.testing.assert_allclose(w["neg_weight"].sum(), np.sum(wb * lens * adv * (adv < 0)),
                               rtol=1e-5)
    np.testing.assert_allclose(w["kl_weight"].sum(), np.sum(wb * lens), rtol=1e-5)
    expect = lens.sum() if norm == "token-mean" else np.sum(lens > 0)
    assert w["denom"].sum() == expect


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_subtree_keeps_ancestor_closed_prefixes(seed):
  rng = np.random.default_rng(seed)
  group = random_group(rng, branches=6)
  tree = build_tree(group)
  kept = {n for n in range(tree.num_nodes) if tree.node_parent[n] < 0}
  for n in range(tree.num_nodes):  # pre-order: parents are decided first
    if tree.node_parent[n] in kept and rng.random() < 0.6:
      kept.add(n)
  sub = tree.subtree(sorted(kept))
  assert sub.num_tokens == int(sum(tree.node_len[n] for n in kept))
  kept_tok = np.isin(tree.node_of, sorted(kept))
  # Each surviving branch is its trajectory cut at the first token outside the kept nodes.
  for t, b in zip(sub.trajectories(), sub.branch_ids):
    path = _ancestors(tree, int(tree.branch_end[b]))
    n_kept = int(kept_tok[path].sum())
    assert len(t) == n_kept and np.all(kept_tok[path[:n_kept]])
    np.testing.assert_array_equal(t.tokens, group[b].tokens[:n_kept])
    np.testing.assert_array_equal(t.loss_mask, group[b].loss_mask[:n_kept])
  # P over kept tokens only == the full tree's P restricted to kept tokens (token-mean).
  full = tree.token_weights()["pos_weight"][kept_tok]
  np.testing.assert_allclose(np.sort(sub.token_weights()["pos_weight"]), np.sort(full),
                             rtol=1e-6)
  non_root = [n for n in range(tree.num_nodes) if tree.node_parent[n] >= 0]
  if non_root:
    with pytest.raises(ValueError, match="ancestor-closed"):
      tree.subtree(non_root[:1])


def _versioned(group, rng):
  """The group with random per-token versions, and the expected version of every token after
  a round trip: the smallest version among the trajectories sharing that token (same key
  fields on the whole prefix), computed per trajectory from the flat group."""
  group = [dataclasses.replace(t, version=rng.integers(0, 5, len(t))) for t in group]
  earliest = {}
  keys = []
  for t in group:
    key, per_token = (), []
    for i in range(len(t)):
      key += ((int(t.tokens[i]), float(t.logprobs[i]), float(t.entropy[i]), int(t.flags[i])),)
      earliest[key] = min(earliest.get(key, 99), int(t.version[i]))
      per_token.append(key)
    keys.append(per_token)
  expect = [np.array([earliest[k] for k in ks], np.int32) for ks in keys]
  return group, [dataclasses.replace(t, version=e) for t, e in zip(group, expect)]


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_version_round_trip_build_pack_unpack_subtree(seed):
  rng = np.random.default_rng(seed)
  pairs = [_versioned(g, rng) for g in _groups(seed, 3)]
  groups, expect = [p[0] for p in pairs], [p[1] for p in pairs]
  trees = [build_tree(g) for g in groups]
  for tree, want in zip(trees, expect):
    _same(tree.trajectories(), want)
  batch = pack_trees(trees, max(t.num_tokens for t in trees))
  flat = [t for g in expect for t in g]
  _same(unpack(batch), flat)
  device = batch.arrays()["version"]
  for b, t in enumerate(flat):  # the device array along each branch's path
    path = _ancestors_row(batch.parent[batch.branch_row[b]], int(batch.branch_end[b]))
    np.testing.assert_array_equal(device[batch.branch_row[b], path], t.version)
  assert np.all(device[batch.mult == 0] == 0)
  tree, want = trees[0], expect[0]
  kept = {n for n in range(tree.num_nodes) if tree.node_parent[n] < 0}
  for n in range(tree.num_nodes):
    if tree.node_parent[n] in kept and rng.random() < 0.6:
      kept.add(n)
  sub = tree.subtree(sorted(kept))
  for t, b in zip(sub.trajectories(), sub.branch_ids):
    np.testing.assert_array_equal(t.version, want[b].version[:len(t)])


def _ancestors_row(parent, i):
  out = []
  while i >= 0:
    out.append(i)
    i = int(parent[i])
  return np.array(out[::-1])


def test_realistic_groups_share_prompt():
  (group,) = realistic_groups(1, prompt_len=(100, 120), turns=(2, 3), assistant_len=(5, 10),
                              tool_len=(5, 10))
  tree = build_tree(group)
  assert len(group) == 8 and tree.node_parent[0] == -1
  assert tree.node_len[0] >= 100 and tree.node_member[0].all()
  assert tree.flat_tokens > tree.num_tokens
  _same(tree.trajectories(), group)


def test_bad_input():
  with pytest.raises(ValueError, match="empty group"):
    build_tree([])
  with pytest.raises(ValueError, match="length 3"):
    Trajectory(tokens=[1, 2, 3], loss_mask=[0, 1])
  with pytest.raises(ValueError, match="non-empty"):
    Trajectory(tokens=[])
  with pytest.raises(ValueError, match="advantage must be finite"):
    Trajectory(tokens=[1, 2], advantage=float("nan"))
  with pytest.raises(ValueError, match="logprobs contains NaN"):
    Trajectory(tokens=[1, 2], logprobs=[0.0, float("nan")])
  with pytest.raises(ValueError, match=r"loss_mask\[0\]"):
    Trajectory(tokens=[1, 2], loss_mask=[1, 1])
  long = Trajectory(tokens=np.arange(50) % 7, loss_mask=np.r_[0, np.ones(49, int)])
  with pytest.raises(ValueError, match="trajectory of 50 tokens > max_tokens=32"):
    pack_trees([[long]], 32)
  with pytest.raises(ValueError, match="no trees"):
    pack_trees([], 32)
  short = [Trajectory(tokens=[1, 2, 3])]
  with pytest.raises(ValueError, match="num_rows"):
    pack_trees([short, short], 3, num_rows=1)
  with pytest.raises(ValueError, match="norm"):
    build_tree(short).token_weights("mean")
