"""Trajectory prefix trees (host side, NumPy): build, restrict to a kept subset, read back.

A group of trajectories of one task shares long prefixes (system prompt, task, early turns).
`build_tree` merges them into a trie and compresses single-child chains into nodes; the
layout is pre-order DFS with every node's tokens contiguous (DESIGN.md section 2).

The per-token fields and how each merges are declared once in `core.fields`. Two
trajectories share a token iff they agree on it and on everything before it in every "key"
field: the token id, the rollout logprob, the rollout entropy and the event flags (tree
rollouts copy these for the shared prefix, so they match exactly). The loss mask may differ
between branches that share a token: it is kept per branch (`branch_mask`) and aggregated
into the loss weights P, N, K by `PrefixTree.token_weights`. `version` keeps the earliest
(smallest) version of the branches through a shared token.

`PrefixTree.subtree` (node ids) and `PrefixTree.truncate` (a token mask, used by pruning)
are one routine: rebuild the tree from the kept prefix of every branch. Packing into
fixed-shape rows is `core.tree_pack` (which imports this module, never the reverse).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from katjax.core import fields
from katjax.core.fields import BRANCH_FIELDS, KEY_FIELDS, MIN_FIELDS, TOKEN_FIELDS, TREE_FIELDS

NORMS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclasses.dataclass(eq=False)
@fields.token_attributes(optional=True)
@fields.branch_attributes(plural=False)
class Trajectory:
  """One rollout: tokens int32[L] and one [L] array per declared field (`core.fields`):
  loss_mask int8, logprobs / entropy float32, flags int32, version int32; and the scalars
  reward, advantage, group_id, policy_version.

  loss_mask[t] = 1 where token t is trained (tokens the policy generated); loss_mask[0] must
  be 0 (the first token has nothing to be predicted from). logprobs are the rollout
  (sampler) logprobs, used for truncated importance weights. flags is a bit field of
  fields.TOOL_CALL / TOOL_RESULT / MEMORY / TOOL_ERROR. Missing per-token arrays are filled
  with the field's pad value (zeros).
  """

  def __post_init__(self):
    tokens = np.asarray(self.tokens)
    if tokens.ndim != 1 or tokens.size == 0:
      raise ValueError(f"Trajectory.tokens must be a non-empty 1-D array, got shape "
                       f"{tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"Trajectory.tokens must be integers, got dtype {tokens.dtype}")
    values = {f.name: getattr(self, f.name) for f in TOKEN_FIELDS}
    for name, arr in fields.token_arrays("Trajectory", values, tokens.size).items():
      setattr(self, name, arr)
    if not np.isin(self.loss_mask, (0, 1)).all():
      raise ValueError("Trajectory.loss_mask must contain only 0 and 1")
    if self.loss_mask[0]:
      raise ValueError("Trajectory.loss_mask[0] must be 0: the first token has no context "
                       "that predicts it")
    for f in TOKEN_FIELDS:
      if np.issubdtype(f.dtype, np.floating) and not np.isfinite(getattr(self, f.name)).all():
        raise ValueError(f"Trajectory.{f.name} contains NaN or inf")
    for b in BRANCH_FIELDS:
      value = b.dtype(getattr(self, b.name)).item()
      if not np.isfinite(value):
        raise ValueError(f"Trajectory.{b.name} must be finite, got {value}")
      setattr(self, b.name, value)

  def __len__(self):
    return int(self.tokens.size)

  def equals(self, other: "Trajectory") -> bool:
    """Exact equality of every field (arrays compared element-wise)."""
    return (isinstance(other, Trajectory)
            and all(np.array_equal(getattr(self, f.name), getattr(other, f.name))
                    for f in TOKEN_FIELDS)
            and all(getattr(self, b.name) == getattr(other, b.name) for b in BRANCH_FIELDS))


@dataclasses.dataclass(eq=False)
@fields.token_attributes(exclude=("loss_mask",))
@fields.branch_attributes(plural=True)
class PrefixTree:
  """A compressed trie of one group. T tree tokens, N nodes, B branches (= trajectories).

  Node level (pre-order: a node's parent has a smaller id; roots have parent -1):
    node_start int32[N], node_len int32[N] (its token cost), node_parent int32[N],
    node_end int32[N] (one past the last token of its subtree), node_member bool[N, B]
    (branches through the node; `node_branches(n)` lists them).
  Token level: positions (= depth = linear position in its trajectory), parent (the token
    whose logits predict it; -1 for a root's first token), subtree_end, node_of: [T]; one [T]
    array per declared token field but the loss mask (tokens, logprobs, entropy, flags,
    version; merged as `core.fields` says); branch_mask int8[B, T] (the loss mask m_b(t) of
    each branch, 0 off the branch's path).
  Branch level: rewards, advantages float64[B], group_ids, policy_versions int32[B] (the
    plural of each Trajectory scalar), branch_end int32[B] (tree index of each branch's last
    token), branch_ids int32[B] (index of the trajectory in the group given to
    `build_tree`, kept through `subtree`).
  """

  positions: np.ndarray
  parent: np.ndarray
  subtree_end: np.ndarray
  node_of: np.ndarray
  branch_mask: np.ndarray
  node_start: np.ndarray
  node_len: np.ndarray
  node_parent: np.ndarray
  node_end: np.ndarray
  node_member: np.ndarray
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
    """The flat trajectories, in branch order (exactly those given to `build_tree`, up to
    the "min" merge of fields like `version` on shared tokens)."""
    return [path_trajectory(self, None, b, path_to(self.parent, int(self.branch_end[b])),
                            self.branch_mask[b])
            for b in range(self.num_branches)]

  def subtree(self, kept_nodes) -> "PrefixTree":
    """The tree restricted to an ancestor-closed set of node ids (a pruned tree).

    Each branch keeps the kept prefix of its path; branches with no kept token are dropped
    (`branch_ids` still names the original trajectories). Nodes are re-laid-out and
    re-compressed, so node ids of the result are new; P, N, K from `token_weights` are over
    kept tokens only (w_b of seq-mean-token-mean uses the kept length of the branch).
    """
    ids = np.asarray(list(kept_nodes), dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_nodes):
      raise ValueError(f"kept node ids must lie in [0, {self.num_nodes})")
    kept = np.zeros(self.num_nodes, bool)
    kept[ids] = True
    par = self.node_parent
    orphan = kept & (par >= 0) & ~kept[np.maximum(par, 0)]
    if orphan.any():
      n = int(np.flatnonzero(orphan)[0])
      raise ValueError(f"kept nodes are not ancestor-closed: node {n} is kept but its parent "
                       f"{int(par[n])} is not")
    return self.truncate(kept[self.node_of])

  def truncate(self, kept_tokens) -> "PrefixTree":
    """The tree rebuilt from the kept prefix of every branch (kept_tokens: bool[T], closed
    under `parent`): `subtree` at token granularity (pruning cuts inside nodes)."""
    kept = np.asarray(kept_tokens, bool)
    if kept.shape != (self.num_tokens,):
      raise ValueError(f"kept_tokens must be bool[{self.num_tokens}], got shape {kept.shape}")
    if not kept.any():
      raise ValueError("subtree: no token kept")
    orphan = kept & (self.parent >= 0) & ~kept[np.maximum(self.parent, 0)]
    if orphan.any():
      i = int(np.flatnonzero(orphan)[0])
      raise ValueError(f"kept tokens are not ancestor-closed: token {i} is kept but its "
                       f"parent {int(self.parent[i])} is not")
    on_path = self.node_member[self.node_of].T  # [B, T]; a path's tokens are in index order
    trajs, ids = [], []
    for b in range(self.num_branches):
      path = np.flatnonzero(on_path[b] & kept)
      if path.size:
        trajs.append(path_trajectory(self, None, b, path, self.branch_mask[b]))
        ids.append(int(self.branch_ids[b]))
    tree = build_tree(trajs)
    tree.branch_ids = np.asarray(ids, np.int32)
    return tree


def build_tree(trajectories) -> PrefixTree:
  """Merge a group of `Trajectory` into a `PrefixTree` (trie, single-child chains compressed).

  A node ends where the branches through it diverge (a "key" field differs) or where one of
  them ends, so every node has one branch set. Children are ordered by their lowest branch
  id (deterministic). "min" fields (`version`) keep the smallest value of the node's branches.
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


def path_trajectory(source, row: int | None, b: int, path, loss_mask) -> Trajectory:
  """Branch b of a tree or a packed batch as a Trajectory: the tree fields at token indices
  `path` (of row `row` of a [R, S] batch; None for a tree's [T] arrays), its loss mask at
  `path`, and its per-branch scalars. The one place a Trajectory is read back."""
  take = (lambda a: a[path]) if row is None else (lambda a: a[row, path])  # noqa: E731
  return Trajectory(loss_mask=np.asarray(loss_mask)[path],
                    **{n: take(getattr(source, n)) for n in TREE_FIELDS},
                    **{f.name: getattr(source, f.plural)[b] for f in BRANCH_FIELDS})


def path_to(parent, end: int) -> np.ndarray:
  """int64[L]: token indices from the root to `end` (following `parent`)."""
  out = []
  i = end
  while i >= 0:
    out.append(i)
    i = int(parent[i])
  return np.array(out[::-1], np.int64)


# --- helpers ------------------------------------------------------------------------------


def _key(t: Trajectory, i: int):
  return tuple(getattr(t, f)[i].item() for f in KEY_FIELDS)


def _common_extension(trajs, members, depth) -> int:
  """Length of the run from `depth` on which all members agree (and none has ended)."""
  first = trajs[members[0]]
  limit = min(len(trajs[b]) for b in members) - depth
  for b in members[1:]:
    t = trajs[b]
    same = np.ones(limit, bool)
    for f in KEY_FIELDS:
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
  per_token = {f: fields.pad_array(f, total) for f in TREE_FIELDS}
  branch_mask = np.zeros((n_br, total), np.int8)
  branch_end = np.zeros(n_br, np.int32)
  for i, (depth, length, _, members) in enumerate(nodes):
    s, span = node_start[i], slice(depth, depth + length)
    for f in TREE_FIELDS:  # "key" fields are equal on all members; "min" ones start here
      per_token[f][s:s + length] = getattr(trajs[members[0]], f)[span]
    for b in members:
      for f in MIN_FIELDS:
        np.minimum(per_token[f][s:s + length], getattr(trajs[b], f)[span],
                   out=per_token[f][s:s + length])
      branch_mask[b, s:s + length] = trajs[b].loss_mask[span]
      if len(trajs[b]) == depth + length:
        branch_end[b] = s + length - 1
  per_branch = {f.plural: np.array([getattr(t, f.name) for t in trajs], f.dtype)
                for f in BRANCH_FIELDS}
  return PrefixTree(
      positions=positions, parent=parent, subtree_end=node_end[node_of], node_of=node_of,
      branch_mask=branch_mask, node_start=node_start, node_len=node_len,
      node_parent=node_parent, node_end=node_end, node_member=member,
      branch_end=branch_end, branch_ids=np.arange(n_br, dtype=np.int32), **per_token,
      **per_branch)
