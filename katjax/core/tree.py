"""Trajectory prefix trees (host side, NumPy): build, prune to a node subset, pack, unpack.

A group of trajectories of one task shares long prefixes (system prompt, task, early turns).
`build_tree` merges them into a trie and compresses single-child chains into nodes; the
layout is pre-order DFS with every node's tokens contiguous (DESIGN.md section 2).

Two trajectories share a token iff they agree on it and on everything before it: the token
id, the rollout logprob, the rollout entropy and the event flags (so every per-token field
has ONE value in the tree; tree rollouts copy these for the shared prefix, so they match
exactly). The loss mask is the one per-token field that may differ between branches that
share a token: it is kept per branch (`branch_mask`) and aggregated into the loss weights
P, N, K by `PrefixTree.token_weights`.

`pack_trees` places whole trees into fixed-shape rows (first-fit decreasing) and returns a
`TreeBatch`; `unpack` rebuilds the flat trajectories from it exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Event flags (bit field, per token).
TOOL_CALL = 1
TOOL_RESULT = 2
MEMORY = 4

NORMS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclasses.dataclass(eq=False)
class Trajectory:
  """One rollout. tokens int32[L]; per token: loss_mask int8, logprobs/entropy float32, flags.

  loss_mask[t] = 1 where token t is trained (tokens the policy generated); loss_mask[0] must
  be 0 (the first token has nothing to be predicted from). logprobs are the rollout
  (sampler) logprobs, used for truncated importance weights. flags is a bit field of
  TOOL_CALL / TOOL_RESULT / MEMORY. Missing per-token arrays default to zeros.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray | None = None
  logprobs: np.ndarray | None = None
  entropy: np.ndarray | None = None
  flags: np.ndarray | None = None
  reward: float = 0.0
  advantage: float = 0.0
  group_id: int = 0
  policy_version: int = 0

  def __post_init__(self):
    tokens = np.asarray(self.tokens)
    if tokens.ndim != 1 or tokens.size == 0:
      raise ValueError(f"Trajectory.tokens must be a non-empty 1-D array, got shape "
                       f"{tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"Trajectory.tokens must be integers, got dtype {tokens.dtype}")
    n = tokens.size
    self.tokens = tokens.astype(np.int32)
    for name, dtype in (("loss_mask", np.int8), ("logprobs", np.float32),
                        ("entropy", np.float32), ("flags", np.int32)):
      value = getattr(self, name)
      arr = np.zeros(n, dtype) if value is None else np.asarray(value)
      if arr.shape != (n,):
        raise ValueError(f"Trajectory.{name} has shape {arr.shape} but tokens has {n} tokens; "
                         f"per-token arrays must all have length {n}")
      setattr(self, name, arr.astype(dtype))
    if not np.isin(self.loss_mask, (0, 1)).all():
      raise ValueError("Trajectory.loss_mask must contain only 0 and 1")
    if self.loss_mask[0]:
      raise ValueError("Trajectory.loss_mask[0] must be 0: the first token has no context "
                       "that predicts it")
    for name in ("logprobs", "entropy"):
      if not np.isfinite(getattr(self, name)).all():
        raise ValueError(f"Trajectory.{name} contains NaN or inf")
    for name in ("reward", "advantage"):
      value = float(getattr(self, name))
      if not np.isfinite(value):
        raise ValueError(f"Trajectory.{name} must be finite, got {value}")
      setattr(self, name, value)
    self.group_id = int(self.group_id)
    self.policy_version = int(self.policy_version)

  def __len__(self):
    return int(self.tokens.size)

  def equals(self, other: "Trajectory") -> bool:
    """Exact equality of every field (arrays compared element-wise)."""
    return (isinstance(other, Trajectory)
            and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _ARRAYS)
            and all(getattr(self, f) == getattr(other, f) for f in _SCALARS))


_ARRAYS = ("tokens", "loss_mask", "logprobs", "entropy", "flags")
_SCALARS = ("reward", "advantage", "group_id", "policy_version")


@dataclasses.dataclass(eq=False)
class PrefixTree:
  """A compressed trie of one group. T tree tokens, N nodes, B branches (= trajectories).

  Node level (pre-order: a node's parent has a smaller id; roots have parent -1):
    node_start int32[N], node_len int32[N] (its token cost), node_parent int32[N],
    node_end int32[N] (one past the last token of its subtree), node_member bool[N, B]
    (branches through the node; `node_branches(n)` lists them).
  Token level: tokens, positions (= depth = linear position in its trajectory), parent (the
    token whose logits predict it; -1 for a root's first token), subtree_end, node_of,
    logprobs, entropy, flags: [T]; branch_mask int8[B, T] (m_b(t), 0 off the branch's path).
  Branch level: advantages, rewards float64[B], group_ids, versions int32[B], branch_end
    int32[B] (tree index of each branch's last token), branch_ids int32[B] (index of the
    trajectory in the group given to `build_tree`, kept through `subtree`).
  """

  tokens: np.ndarray
  positions: np.ndarray
  parent: np.ndarray
  subtree_end: np.ndarray
  node_of: np.ndarray
  logprobs: np.ndarray
  entropy: np.ndarray
  flags: np.ndarray
  branch_mask: np.ndarray
  node_start: np.ndarray
  node_len: np.ndarray
  node_parent: np.ndarray
  node_end: np.ndarray
  node_member: np.ndarray
  advantages: np.ndarray
  rewards: np.ndarray
  group_ids: np.ndarray
  versions: np.ndarray
  branch_end: np.ndarray
  branch_ids: np.ndarray

  @property
  def num_tokens(self) -> int:
    """Tokens in the tree (each shared token counted once)."""
    return int(self.tokens.size)

  @property
  def num_nodes(self) -> int:
    return int(self.node_start.size)

  @property
  def num_branches(self) -> int:
    return int(self.advantages.size)

  @property
  def flat_tokens(self) -> int:
    """Tokens of the flat, unshared trajectories (sum of their lengths)."""
    return int(np.sum(self.positions[self.branch_end] + 1))

  def node_branches(self, n: int) -> np.ndarray:
    """int[k]: ids (0..B-1) of the branches whose path goes through node n."""
    return np.flatnonzero(self.node_member[n])

  def node_tokens(self, n: int) -> np.ndarray:
    """int32[node_len[n]]: the token ids of node n."""
    return self.tokens[self.node_start[n]:self.node_start[n] + self.node_len[n]]

  def token_weights(self, norm: str = "token-mean") -> dict:
    """Per-token loss weights (float32[T] each) and the denominator for `norm`.

    With w_b the per-branch normaliser (1 for token-mean and seq-mean-token-sum, 1/|m_b| for
    seq-mean-token-mean) and m_b(t) the branch mask:
      pos_weight P_t = sum_{A_b > 0} w_b m_b(t) A_b    neg_weight N_t = same over A_b < 0
      kl_weight  K_t = sum_b w_b m_b(t)
      count_t (pos_count_t, neg_count_t) = sum_b m_b(t) (over A_b > 0, A_b < 0): for metrics
    denom float32[T]: the loss denominator spread over tokens, so that sum_t denom_t is the
    total trained tokens (token-mean: denom_t = count_t) or the number of branches with a
    trained token (seq-mean-*: 1 at each such branch's last token); per-token so every
    packed array is [R, S] and any split of rows keeps its share.
    """
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    m = self.branch_mask.astype(np.float64)
    lengths = m.sum(axis=1)
    if norm == "seq-mean-token-mean":
      w = np.where(lengths > 0, 1.0 / np.maximum(lengths, 1.0), 0.0)
    else:
      w = np.ones_like(lengths)
    a = self.advantages.astype(np.float64)
    pos, neg = a > 0, a < 0
    out = {"pos_weight": (w * a * pos) @ m, "neg_weight": (w * a * neg) @ m,
           "kl_weight": w @ m, "count": m.sum(axis=0), "pos_count": pos.astype(float) @ m,
           "neg_count": neg.astype(float) @ m}
    if norm == "token-mean":
      out["denom"] = out["count"]
    else:
      out["denom"] = np.bincount(self.branch_end[lengths > 0], minlength=self.num_tokens)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}

  def trajectories(self) -> list[Trajectory]:
    """The flat trajectories, in branch order (exactly those given to `build_tree`)."""
    out = []
    for b in range(self.num_branches):
      path = _path(self.parent, int(self.branch_end[b]))
      out.append(Trajectory(tokens=self.tokens[path], loss_mask=self.branch_mask[b, path],
                            logprobs=self.logprobs[path], entropy=self.entropy[path],
                            flags=self.flags[path], reward=self.rewards[b],
                            advantage=self.advantages[b], group_id=self.group_ids[b],
                            policy_version=self.versions[b]))
    return out

  def subtree(self, kept_nodes) -> "PrefixTree":
    """The tree restricted to an ancestor-closed set of node ids (a pruned tree).

    Each branch keeps the kept prefix of its path; branches with no kept token are dropped
    (`branch_ids` still names the original trajectories). Nodes are re-laid-out and
    re-compressed, so node ids of the result are new; P, N, K from `token_weights` are over
    kept tokens only (w_b of seq-mean-token-mean uses the kept length of the branch).
    """
    kept = np.zeros(self.num_nodes, bool)
    ids = np.asarray(list(kept_nodes), dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_nodes):
      raise ValueError(f"kept node ids must lie in [0, {self.num_nodes})")
    kept[ids] = True
    par = self.node_parent
    orphan = kept & (par >= 0) & ~kept[np.maximum(par, 0)]
    if orphan.any():
      n = int(np.flatnonzero(orphan)[0])
      raise ValueError(f"kept nodes are not ancestor-closed: node {n} is kept but its parent "
                       f"{int(par[n])} is not")
    if not kept.any():
      raise ValueError("subtree: no node kept")
    trajs, keep_ids = [], []
    for t, b in zip(self.trajectories(), range(self.num_branches)):
      path = _path(self.parent, int(self.branch_end[b]))
      n_kept = int(np.sum(kept[self.node_of[path]]))  # kept part of a path is a prefix
      if n_kept:
        trajs.append(Trajectory(tokens=t.tokens[:n_kept], loss_mask=t.loss_mask[:n_kept],
                                logprobs=t.logprobs[:n_kept], entropy=t.entropy[:n_kept],
                                flags=t.flags[:n_kept], reward=t.reward,
                                advantage=t.advantage, group_id=t.group_id,
                                policy_version=t.policy_version))
        keep_ids.append(int(self.branch_ids[b]))
    tree = build_tree(trajs)
    tree.branch_ids = np.asarray(keep_ids, np.int32)
    return tree


def build_tree(trajectories) -> PrefixTree:
  """Merge a group of `Trajectory` into a `PrefixTree` (trie, single-child chains compressed).

  A node ends where the branches through it diverge or where one of them ends, so every
  node has one branch set. Children are ordered by their lowest branch id (deterministic).
  """
  trajs = list(trajectories)
  if not trajs:
    raise ValueError("build_tree: empty group (no trajectories)")
  for i, t in enumerate(trajs):
    if not isinstance(t, Trajectory):
      raise ValueError(f"build_tree: item {i} is a {type(t).__name__}, not a Trajectory")
  nodes = []  # (start depth, length, parent node, members)
  roots = {}
  for b, t in enumerate(trajs):  # trajectories differing at token 0 make a forest
    roots.setdefault(_key(t, 0), []).append(b)
  stack = [(0, -1, members) for members in reversed(list(roots.values()))]
  # Iterative pre-order DFS: pop a member set sharing its first `depth` tokens.
  while stack:
    depth, parent, members = stack.pop()
    length = _common_extension(trajs, members, depth)
    node = len(nodes)
    nodes.append((depth, length, parent, members))
    end = depth + length
    rest = [b for b in members if len(trajs[b]) > end]
    groups = {}
    for b in rest:  # dict keeps insertion order: children ordered by lowest branch id
      groups.setdefault(_key(trajs[b], end), []).append(b)
    for child in reversed(list(groups.values())):
      stack.append((end, node, child))
  return _layout(trajs, nodes)


# --- helpers ------------------------------------------------------------------------------


def _key(t: Trajectory, i: int):
  return (int(t.tokens[i]), float(t.logprobs[i]), float(t.entropy[i]), int(t.flags[i]))


def _common_extension(trajs, members, depth) -> int:
  """Length of the run from `depth` on which all members agree (and none has ended)."""
  first = trajs[members[0]]
  limit = min(len(trajs[b]) for b in members) - depth
  for b in members[1:]:
    t = trajs[b]
    same = np.ones(limit, bool)
    for f in ("tokens", "logprobs", "entropy", "flags"):
      same &= getattr(t, f)[depth:depth + limit] == getattr(first, f)[depth:depth + limit]
    diff = np.flatnonzero(~same)
    if diff.size:
      limit = int(diff[0])
  return limit


def _layout(trajs, nodes) -> PrefixTree:
  n_nodes, n_br = len(nodes), len(trajs)
  node_len = np.array([n[1] for n in nodes], np.int32)
  node_start = np.concatenate([[0], np.cumsum(node_len)[:-1]]).astype(np.int32)
  node_parent = np.array([n[2] for n in nodes], np.int32)
  member = np.zeros((n_nodes, n_br), bool)
  for i, n in enumerate(nodes):
    member[i, n[3]] = True
  size = node_len.astype(np.int64).copy()
  for i in range(n_nodes - 1, 0, -1):  # children come after parents in pre-order
    if node_parent[i] >= 0:
      size[node_parent[i]] += size[i]
  node_end = (node_start + size).astype(np.int32)
  total = int(node_len.sum())
  node_of = np.repeat(np.arange(n_nodes, dtype=np.int32), node_len)
  idx = np.arange(total, dtype=np.int32)
  first = idx == node_start[node_of]
  par_last = np.where(node_parent >= 0, node_start[node_parent] + node_len[node_parent] - 1,
                      -1)
  parent = np.where(first, par_last[node_of], idx - 1).astype(np.int32)
  depth0 = np.array([n[0] for n in nodes], np.int32)
  positions = (depth0[node_of] + idx - node_start[node_of]).astype(np.int32)
  fields = {f: np.zeros(total, getattr(trajs[0], f).dtype)
            for f in ("tokens", "logprobs", "entropy", "flags")}
  branch_mask = np.zeros((n_br, total), np.int8)
  branch_end = np.zeros(n_br, np.int32)
  for i, (depth, length, _, members) in enumerate(nodes):
    s = node_start[i]
    src = trajs[members[0]]
    for f in fields:
      fields[f][s:s + length] = getattr(src, f)[depth:depth + length]
    for b in members:
      branch_mask[b, s:s + length] = trajs[b].loss_mask[depth:depth + length]
      if len(trajs[b]) == depth + length:
        branch_end[b] = s + length - 1
  return PrefixTree(
      positions=positions, parent=parent, subtree_end=node_end[node_of], node_of=node_of,
      branch_mask=branch_mask, node_start=node_start, node_len=node_len,
      node_parent=node_parent, node_end=node_end, node_member=member,
      advantages=np.array([t.advantage for t in trajs], np.float64),
      rewards=np.array([t.reward for t in trajs], np.float64),
      group_ids=np.array([t.group_id for t in trajs], np.int32),
      versions=np.array([t.policy_version for t in trajs], np.int32),
      branch_end=branch_end, branch_ids=np.arange(n_br, dtype=np.int32), **fields)


def _path(parent, end: int) -> np.ndarray:
  """Token indices from the root to `end` (following `parent`)."""
  out = []
  i = end
  while i >= 0:
    out.append(i)
    i = int(parent[i])
  return np.array(out[::-1], np.int64)


# pack_trees / unpack live in tree_pack (this file's size); imported last since they use the
# classes above.
from katjax.core.tree_pack import TreeBatch, pack_trees, unpack  # noqa: E402,F401
