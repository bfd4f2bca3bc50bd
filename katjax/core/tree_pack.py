"""Packing prefix trees into fixed-shape rows (`TreeBatch`) and unpacking them exactly.

Whole trees go into rows of `max_tokens` tokens, first-fit decreasing by token count; a tree
is never split across rows (its tokens attend to its shared prefix). Padding tokens get
`subtree_end[i] = i + 1`, `parent = -1`, zero weights and every declared field's pad value.
The per-token fields travel under their declared names (`core.fields`); those marked
`device` (tokens, logprobs, version) join the tree structure and the loss weights in the
device batch `TreeBatch.arrays()`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from katjax.core import fields
from katjax.core.fields import BRANCH_FIELDS, DEVICE_FIELDS, TOKEN_FIELDS, TREE_FIELDS
from katjax.core.tree import PrefixTree, build_tree, path_to, path_trajectory

# `PrefixTree.token_weights` arrays, float32 [R, S] in the batch.
WEIGHT_KEYS = ("pos_weight", "neg_weight", "kl_weight", "count", "pos_count", "neg_count",
               "denom")
# Arrays [R, S] the loss needs on device (`TreeBatch.arrays()`); the rest is host-side.
DEVICE_KEYS = DEVICE_FIELDS + ("positions", "subtree_end", "parent", "mult") + WEIGHT_KEYS


@dataclasses.dataclass(eq=False)
@fields.token_attributes()
@fields.branch_attributes(plural=True)
class TreeBatch:
  """R rows of S tokens holding whole trees. NumPy; `arrays()` is the device pytree.

  Per token [R, S]: one array per declared token field (tokens, logprobs, entropy, flags,
  version; loss_mask int8 is the mask of the lowest branch through the token, host-side),
  positions, subtree_end, parent (row index of the predicting token, -1 for roots and
  padding) int32; pos_weight P, neg_weight N, kl_weight K, count, pos_count, neg_count,
  denom float32 (see `PrefixTree.token_weights`; the sum of denom is the loss denominator
  for `norm`); mult int32 (branches through the token, 0 on padding).
  Host-side, for `unpack`: loss_mask_exceptions int32[E, 3] (branch, row, index where that
  branch's loss mask differs from `loss_mask`); per branch (all trees, input order): the
  plural of each Trajectory scalar (rewards, advantages, group_ids, policy_versions),
  branch_row, branch_end, branch_ids int32; per tree: tree_row, tree_offset int32,
  tree_branch_start int32[n_trees + 1].
  """

  positions: np.ndarray
  subtree_end: np.ndarray
  parent: np.ndarray
  pos_weight: np.ndarray
  neg_weight: np.ndarray
  kl_weight: np.ndarray
  count: np.ndarray
  pos_count: np.ndarray
  neg_count: np.ndarray
  denom: np.ndarray
  mult: np.ndarray
  norm: str
  loss_mask_exceptions: np.ndarray
  branch_row: np.ndarray
  branch_end: np.ndarray
  branch_ids: np.ndarray
  tree_row: np.ndarray
  tree_offset: np.ndarray
  tree_branch_start: np.ndarray

  def arrays(self) -> dict:
    """The device batch: {name: np.ndarray [R, S]} for `katjax.core.losses`."""
    return {k: getattr(self, k) for k in DEVICE_KEYS}

  @property
  def tree_tokens(self) -> int:
    return int(np.sum(self.mult > 0))

  @property
  def flat_tokens(self) -> int:
    return int(np.sum(self.mult))


def pack_trees(trees, max_tokens: int, *, norm: str = "token-mean",
               num_rows: int | None = None) -> TreeBatch:
  """Pack `PrefixTree`s (or groups: lists of Trajectory) into rows of `max_tokens` tokens.

  num_rows: fixed number of rows (extra rows are all padding; a ValueError if the trees do
  not fit); default: as many as first-fit needs. The loss weights use `norm`.
  """
  if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
    raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
  trees = [t if isinstance(t, PrefixTree) else build_tree(t) for t in trees]
  if not trees:
    raise ValueError("pack_trees: no trees given")
  for i, tree in enumerate(trees):
    longest = int(np.max(tree.positions[tree.branch_end])) + 1
    if longest > max_tokens:
      raise ValueError(f"pack_trees: tree {i} has a trajectory of {longest} tokens > "
                       f"max_tokens={max_tokens}; a trajectory cannot be split across rows: "
                       f"raise max_tokens or truncate it")
    if tree.num_tokens > max_tokens:
      raise ValueError(f"pack_trees: tree {i} has {tree.num_tokens} tokens > max_tokens="
                       f"{max_tokens}; raise max_tokens or prune it (tree.subtree)")
  rows, free = [], []  # first-fit decreasing (stable, so deterministic)
  placement = [None] * len(trees)
  for i in sorted(range(len(trees)), key=lambda j: -trees[j].num_tokens):
    n = trees[i].num_tokens
    r = next((r for r in range(len(rows)) if free[r] >= n), None)
    if r is None:
      rows.append([])
      free.append(max_tokens)
      r = len(rows) - 1
    placement[i] = (r, max_tokens - free[r])
    free[r] -= n
  n_rows = len(rows) if num_rows is None else int(num_rows)
  if n_rows < len(rows):
    raise ValueError(f"pack_trees: the trees need {len(rows)} rows of {max_tokens} tokens but "
                     f"num_rows={num_rows}")
  return _fill(trees, placement, n_rows, int(max_tokens), norm)


def unpack(batch: TreeBatch) -> list:
  """The flat trajectories of every tree of `batch` (tree input order, then branch order)."""
  flips = {}
  for b, r, i in batch.loss_mask_exceptions:
    flips.setdefault(int(b), []).append((int(r), int(i)))
  out = []
  for b in range(batch.branch_row.size):
    r = int(batch.branch_row[b])
    mask = batch.loss_mask[r].copy()
    for _, i in flips.get(b, ()):
      mask[i] = 1 - mask[i]
    path = path_to(batch.parent[r], int(batch.branch_end[b]))
    out.append(path_trajectory(batch, r, b, path, mask))
  return out


def _fill(trees, placement, n_rows, size, norm) -> TreeBatch:
  shape = (n_rows, size)
  idx = np.broadcast_to(np.arange(size, dtype=np.int32), shape)
  a = {f.name: fields.pad_array(f.name, size * n_rows).reshape(shape) for f in TOKEN_FIELDS}
  a.update({k: np.zeros(shape, np.float32) for k in WEIGHT_KEYS})
  a.update(positions=np.zeros(shape, np.int32), subtree_end=(idx + 1).astype(np.int32),
           parent=np.full(shape, -1, np.int32), mult=np.zeros(shape, np.int32))
  branch = {k: [] for k in ["branch_row", "branch_end", "branch_ids"]
            + [f.plural for f in BRANCH_FIELDS]}
  exceptions, starts = [], [0]
  for tree, (r, o) in zip(trees, placement):
    s = slice(o, o + tree.num_tokens)
    for k in TREE_FIELDS + ("positions",):
      a[k][r, s] = getattr(tree, k)
    a["subtree_end"][r, s] = tree.subtree_end + o
    a["parent"][r, s] = np.where(tree.parent >= 0, tree.parent + o, -1)
    a["mult"][r, s] = tree.node_member.sum(axis=1)[tree.node_of]
    for k, v in tree.token_weights(norm).items():
      a[k][r, s] = v
    # Loss mask of the lowest branch through each token, plus where other branches differ.
    first = np.argmax(tree.node_member, axis=1)[tree.node_of]
    ref = tree.branch_mask[first, np.arange(tree.num_tokens)]
    a["loss_mask"][r, s] = ref
    on_path = tree.node_member[tree.node_of].T  # [B, T]
    base = starts[-1]
    for b, i in np.argwhere(on_path & (tree.branch_mask != ref[None])):
      exceptions.append((base + b, r, o + i))
    branch["branch_row"] += [r] * tree.num_branches
    branch["branch_end"] += list(tree.branch_end + o)
    for k in ["branch_ids"] + [f.plural for f in BRANCH_FIELDS]:
      branch[k] += list(getattr(tree, k))
    starts.append(base + tree.num_branches)
  dtypes = {f.plural: f.dtype for f in BRANCH_FIELDS}
  branch = {k: np.asarray(v, dtypes.get(k, np.int32)) for k, v in branch.items()}
  return TreeBatch(
      norm=norm, loss_mask_exceptions=np.asarray(exceptions, np.int32).reshape(-1, 3),
      tree_row=np.array([p[0] for p in placement], np.int32),
      tree_offset=np.array([p[1] for p in placement], np.int32),
      tree_branch_start=np.asarray(starts, np.int32), **a, **branch)
