"""Entropy-based pruning of trajectory prefix trees under a token budget (DESIGN.md section 3).

The selection works on a plain node-level view (`Nodes`, pre-order, parent -1 for a root):
  H(n)    summed entropy of the trainable tokens of n
  p(n)    reach = branches through n / branches of the group
  LTE(n)  = H(n) + gamma sum_c p(c|n) LTE(c),   priority = p(n) LTE(n) / cost(n)
Protected nodes (tool calls, tool results, memory events, multi-tool-call turns) and the
path to them rank ahead of the rest (`protect_first`). Best-first expansion from the roots
keeps nodes until the next one does not fit, so the kept set is ancestor-closed and never
over budget. `select` runs the jit kernel (`prune_jit`); `select_reference` is the plain
heapq version it must equal. The baselines share the same expansion: "truncation" cuts
every trajectory's tail at one common length (priority falls with the end position),
"random" uses random priorities.

Tree level: `node_stats` turns a `PrefixTree` into `Nodes`, first splitting long nodes at
turn boundaries (trained <-> untrained, tool-result start/end) so one long tool output does
not eat the budget; `prune_tree` returns the pruned tree (rebuilt from the kept prefix of
every branch, so P, N, K are over kept tokens only); `prune_groups` is what the RL trainer
calls: one joint budget over all groups of a step (`prune_batch` also packs them into a
fixed [rows, tokens] TreeBatch).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple

import numpy as np

from katjax.core import prune_jit
from katjax.core.fields import MEMORY, TOOL_CALL, TOOL_RESULT
from katjax.core.tree import PrefixTree, build_tree
from katjax.core.tree_pack import pack_trees

SELECTORS = ("entropy", "truncation", "random")


class Nodes(NamedTuple):
  """Node-level view. All [N], pre-order (parent[i] < i, -1 for a root).

  cost int32 (tokens), entropy float32 (summed entropy of trainable tokens), branches
  float32 (branches through the node; any positive scale per tree), protected bool,
  signal float32 (sum over the node's tokens of H_t (|P_t| + |N_t|), for the report).
  """

  parent: np.ndarray
  cost: np.ndarray
  entropy: np.ndarray
  branches: np.ndarray
  protected: np.ndarray
  signal: np.ndarray


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Pruning options. protect_flags: event bits (fields.TOOL_CALL | ...) that protect a node;
  protect_multi_call: also protect turns with >= 2 separate tool-call spans;
  split_turns / max_node_tokens: split nodes at turn boundaries / into pieces of at most
  this many tokens (0: no limit); norm: loss normaliser used for P, N (the signal weight).
  """

  gamma: float = 0.9
  protect_first: bool = True
  selector: str = "entropy"
  seed: int = 0
  split_turns: bool = True
  max_node_tokens: int = 0
  protect_flags: int = TOOL_CALL | TOOL_RESULT | MEMORY
  protect_multi_call: bool = True
  norm: str = "token-mean"

  def __post_init__(self):
    if self.selector not in SELECTORS:
      raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
    if not 0.0 <= float(self.gamma) <= 1.0:
      raise ValueError(f"gamma must lie in [0, 1], got {self.gamma}")
    if self.max_node_tokens < 0:
      raise ValueError(f"max_node_tokens must be >= 0, got {self.max_node_tokens}")


def make_nodes(parent, cost, entropy, branches=None, protected=None, signal=None):
  """Nodes from array-likes, validated; NaN/inf entropies become 0. Returns (Nodes, nan_count)."""
  parent = np.asarray(parent, np.int64)
  n = parent.size
  if parent.ndim != 1 or n == 0:
    raise ValueError(f"parent must be a non-empty 1-D array, got shape {parent.shape}")
  idx = np.arange(n)
  if np.any(parent >= idx) or np.any(parent < -1):
    bad = int(np.flatnonzero((parent >= idx) | (parent < -1))[0])
    raise ValueError(f"nodes must be in pre-order with parent in [-1, i): node {bad} has "
                     f"parent {int(parent[bad])}")
  ent, nan_count = clean_entropy(entropy)
  arrays = {"cost": np.asarray(cost), "entropy": ent,
            "branches": np.ones(n) if branches is None else np.asarray(branches),
            "protected": np.zeros(n, bool) if protected is None else np.asarray(protected),
            "signal": ent if signal is None else clean_entropy(signal)[0]}
  for name, a in arrays.items():
    if a.shape != (n,):
      raise ValueError(f"{name} has shape {a.shape}, expected ({n},) like parent")
  if np.any(arrays["cost"] < 1):
    raise ValueError("every node must cost at least 1 token")
  if np.sum(arrays["cost"], dtype=np.int64) >= 2**31:
    raise ValueError("total cost must be below 2^31 tokens (int32 prefix sums)")
  if not np.all(np.isfinite(arrays["branches"])) or np.any(arrays["branches"] <= 0):
    raise ValueError("branches must be finite and > 0 on every node")
  nodes = Nodes(parent.astype(np.int32), arrays["cost"].astype(np.int32),
                ent.astype(np.float32), arrays["branches"].astype(np.float32),
                arrays["protected"].astype(bool), arrays["signal"].astype(np.float32))
  return nodes, nan_count


def clean_entropy(x):
  """(float32[...] with NaN/inf replaced by 0 and negatives clipped to 0, count replaced)."""
  x = np.asarray(x, np.float32)
  bad = ~np.isfinite(x)
  return np.where(bad, 0.0, np.maximum(x, 0.0)).astype(np.float32), int(bad.sum())


def select(nodes: Nodes, budget: int, cfg: PruneConfig = PruneConfig()) -> np.ndarray:
  """bool[N]: kept nodes, by the jit kernel (arrays padded to a power of two >= 128)."""
  budget = _check_budget(nodes, budget)
  n = nodes.parent.size
  size = padded_size(n)
  pad = lambda a, v: np.concatenate([a, np.full(size - n, v, a.dtype)])  # noqa: E731
  parent, cost = pad(nodes.parent, -1), pad(nodes.cost, 0)
  valid = pad(np.ones(n, bool), False)
  if cfg.selector == "entropy":
    kept = prune_jit.select_entropy(parent, cost, pad(nodes.entropy, 0), pad(nodes.branches, 0),
                                    pad(nodes.protected, False), valid, np.int32(budget),
                                    np.float32(cfg.gamma), np.bool_(cfg.protect_first))
  else:
    kept = prune_jit.select_priority(parent, cost, pad(baseline_priority(nodes, cfg), 0), valid,
                                     np.int32(budget))
  return _check_kept(nodes, budget, np.asarray(kept)[:n])


def padded_size(n: int) -> int:
  """Node-array size the kernel is compiled for: n + 1 (the kernel's virtual root) rounded
  up to a multiple of 1/8 of its power of two (aligned; <= 12.5% padding), minus 1."""
  step = max(128, 1 << max(0, (n + 1).bit_length() - 3))
  return -(-(n + 1) // step) * step - 1


def select_reference(nodes: Nodes, budget: int,
                     cfg: PruneConfig = PruneConfig()) -> np.ndarray:
  """bool[N]: the plain host version: heapq best-first from the roots, float64 priorities."""
  budget = _check_budget(nodes, budget)
  n = nodes.parent.size
  if cfg.selector == "entropy":
    priority = priorities(nodes, cfg.gamma)
    rank = protected_path(nodes) & cfg.protect_first
  else:
    priority = baseline_priority(nodes, cfg).astype(np.float64)
    rank = np.zeros(n, bool)
  children = [[] for _ in range(n)]
  for i in range(n):
    if nodes.parent[i] >= 0:
      children[nodes.parent[i]].append(i)
  heap = [(-int(rank[i]), -priority[i], i) for i in range(n) if nodes.parent[i] < 0]
  heapq.heapify(heap)
  kept, used = np.zeros(n, bool), 0
  while heap:
    i = heapq.heappop(heap)[2]
    if used + nodes.cost[i] > budget:
      break
    kept[i], used = True, used + int(nodes.cost[i])
    for c in children[i]:
      heapq.heappush(heap, (-int(rank[c]), -priority[c], c))
  return _check_kept(nodes, budget, kept)


def node_stats(tree, cfg: PruneConfig = PruneConfig()):
  """(Nodes, split) of a PrefixTree; split: dict of int32[N'] sub-node `start`, `length`
  (tree token ranges, pre-order) and `node` (the tree node each piece comes from), plus
  `nan_entropies` (NaN/inf token entropies, counted and treated as 0).

  With cfg.split_turns, tree nodes are cut where a turn starts (trained <-> untrained, or a
  tool result starts/ends), and into pieces of at most cfg.max_node_tokens if set; the pieces
  of a node form a chain. A trainable token is one some branch trains (branch_mask).
  """
  t_count = tree.num_tokens
  ent, nan_count = clean_entropy(tree.entropy)
  trainable = tree.branch_mask.any(axis=0)
  tool_result = (tree.flags & TOOL_RESULT) != 0
  tool_call = (tree.flags & TOOL_CALL) != 0
  idx = np.arange(t_count)
  start = idx == tree.node_start[tree.node_of]
  if cfg.split_turns:
    turn = np.zeros(t_count, bool)
    turn[1:] = (trainable[1:] != trainable[:-1]) | (tool_result[1:] != tool_result[:-1])
    start |= turn
  if cfg.max_node_tokens:
    seg_start = np.maximum.accumulate(np.where(start, idx, 0))
    start |= (idx - seg_start) % cfg.max_node_tokens == 0
  starts = np.flatnonzero(start)
  length = np.diff(np.append(starts, t_count))
  piece_of = np.cumsum(start) - 1  # piece id of every token
  node = tree.node_of[starts]
  first = starts == tree.node_start[node]
  last_piece = piece_of[tree.node_start + tree.node_len - 1]  # per tree node
  tree_par = tree.node_parent[node]
  parent = np.where(first, np.where(tree_par >= 0, last_piece[np.maximum(tree_par, 0)], -1),
                    np.arange(starts.size) - 1)
  h = np.where(trainable, ent, 0.0)
  w = tree.token_weights(cfg.norm)
  signal = h * (np.abs(w["pos_weight"]) + np.abs(w["neg_weight"]))
  flagged = (tree.flags & cfg.protect_flags) != 0
  protected = np.add.reduceat(flagged.astype(np.int64), starts) > 0
  if cfg.protect_multi_call:  # >= 2 separate tool-call spans in one piece (one turn)
    call_start = tool_call & ~np.concatenate([[False], tool_call[:-1]]) | (tool_call & start)
    protected |= np.add.reduceat(call_start.astype(np.int64), starts) >= 2
  nodes, _ = make_nodes(parent, length, np.add.reduceat(h.astype(np.float64), starts),
                        tree.node_member.sum(axis=1)[node], protected,
                        np.add.reduceat(signal.astype(np.float64), starts))
  split = {"start": starts.astype(np.int32), "length": length.astype(np.int32),
           "node": node.astype(np.int32), "nan_entropies": nan_count}
  return nodes, split


def prune_tree(tree, budget: int, cfg: PruneConfig = PruneConfig()):
  """(pruned PrefixTree, info) keeping at most `budget` tree tokens, selected by cfg.

  The pruned tree is rebuilt from the kept prefix of every branch, so its token_weights
  (P, N, K, denom) are over kept tokens only; branches with no kept token are dropped
  (`branch_ids` names the original trajectories). info: tokens, kept_tokens,
  retained_signal, nan_entropies, nodes (pieces after splitting), kept_nodes.
  """
  trees, info = prune_groups([tree], budget, cfg)
  return trees[0], info


def prune_groups(groups, budget: int, cfg: PruneConfig = PruneConfig()):
  """(list of pruned PrefixTree, info): one step's groups under ONE joint token budget.

  groups: PrefixTrees or lists of Trajectory (one per task). The groups form one forest;
  each group's reach is normalised by its own branch count, so priorities compare across
  groups. A group none of whose tokens is kept is left out (info["dropped_groups"]).
  This is the RL data path: the trainer calls it on the step's groups, then `pack_trees`.
  """
  trees = [g if isinstance(g, PrefixTree) else build_tree(g) for g in groups]
  if not trees:
    raise ValueError("prune_groups: no groups")
  parts = [node_stats(t, cfg) for t in trees]
  offsets = np.cumsum([0] + [p[0].parent.size for p in parts])
  fields = []
  for (nodes, _), off in zip(parts, offsets):
    b = nodes.branches / nodes.branches[nodes.parent < 0].sum()  # reach within the group
    fields.append(nodes._replace(parent=np.where(nodes.parent >= 0, nodes.parent + off, -1),
                                 branches=b))
  forest = Nodes(*(np.concatenate(f) for f in zip(*fields)))
  kept = select(forest, budget, cfg)
  out, dropped = [], []
  for i, (tree, (_, split)) in enumerate(zip(trees, parts)):
    keep = kept[offsets[i]:offsets[i + 1]]
    if keep.any():
      # Non-finite token entropies (counted in info) are stored as 0 in the pruned tree.
      clean = dataclasses.replace(tree, entropy=clean_entropy(tree.entropy)[0])
      out.append(clean.truncate(np.repeat(keep, split["length"])))
    else:
      dropped.append(i)
  info = {"tokens": int(forest.cost.sum()), "kept_tokens": int(forest.cost[kept].sum()),
          "retained_signal": retained_signal(forest, kept),
          "nan_entropies": sum(p[1]["nan_entropies"] for p in parts),
          "nodes": int(forest.parent.size), "kept_nodes": int(kept.sum()),
          "dropped_groups": dropped}
  return out, info


def prune_batch(groups, num_rows: int, row_tokens: int, cfg: PruneConfig = PruneConfig(),
                norm: str = "token-mean"):
  """(TreeBatch [num_rows, row_tokens], info): the step's groups pruned to fit the batch.

  A group larger than one row is first pruned to row_tokens on its own (a tree never spans
  rows); then all groups share the budget num_rows * row_tokens (`prune_groups`), lowered
  by 3% per retry while first-fit packing leaves a tree without a row.
  """
  trees = [g if isinstance(g, PrefixTree) else build_tree(g) for g in groups]
  trees = [prune_tree(t, row_tokens, cfg)[0] if t.num_tokens > row_tokens else t
           for t in trees]
  budget = int(num_rows) * int(row_tokens)
  for _ in range(20):
    pruned, info = prune_groups(trees, budget, cfg)
    try:
      return pack_trees(pruned, row_tokens, norm=norm, num_rows=num_rows), info
    except ValueError as e:  # fragmentation: the trees fit the budget but not the rows
      if "num_rows=" not in str(e):
        raise
      budget = int(budget * 0.97)
  raise ValueError(f"prune_batch: could not pack the groups into {num_rows} rows of "
                   f"{row_tokens} tokens")


def priorities(nodes: Nodes, gamma: float) -> np.ndarray:
  """float64[N]: p(n) LTE(n) / cost(n), by the direct recursion (children before parents)."""
  n = nodes.parent.size
  b = nodes.branches.astype(np.float64)
  below = np.zeros(n)  # sum_c p(c|n) LTE(c), filled by the children (they come after n)
  lte = np.zeros(n)
  for i in range(n - 1, -1, -1):
    lte[i] = float(nodes.entropy[i]) + gamma * below[i]
    par = nodes.parent[i]
    if par >= 0:
      below[par] += b[i] / b[par] * lte[i]
  return b / b[nodes.parent < 0].sum() * lte / nodes.cost


def protected_path(nodes: Nodes) -> np.ndarray:
  """bool[N]: the node or one of its descendants is protected."""
  out = nodes.protected.copy()
  for i in range(nodes.parent.size - 1, 0, -1):
    if out[i] and nodes.parent[i] >= 0:
      out[nodes.parent[i]] = True
  return out


def baseline_priority(nodes: Nodes, cfg: PruneConfig) -> np.ndarray:
  """float32[N] priorities of the baselines (best-first with them is ancestor-closed).

  truncation: 2^24 minus the node's end position in its trajectories, so the kept set is
  every branch cut at one common length; random: uniform draws from cfg.seed.
  """
  if cfg.selector == "random":
    return np.random.default_rng(cfg.seed).random(nodes.parent.size).astype(np.float32)
  end = nodes.cost.astype(np.int64).copy()
  for i in range(1, nodes.parent.size):  # pre-order: the parent's end is already final
    if nodes.parent[i] >= 0:
      end[i] += end[nodes.parent[i]]
  if end.max() >= 2**24:
    raise ValueError(f"truncation baseline: a trajectory of {int(end.max())} tokens exceeds 2^24")
  return (2.0**24 - end).astype(np.float32)  # exact in float32, >= 0 as the kernel needs


def retained_signal(nodes: Nodes, kept) -> float:
  """sum_kept H (|P| + |N|) / sum_all (1.0 for a tree without signal)."""
  total = float(np.sum(nodes.signal, dtype=np.float64))
  if total <= 0:
    return 1.0
  return float(np.sum(nodes.signal[np.asarray(kept, bool)], dtype=np.float64)) / total


def _check_budget(nodes: Nodes, budget) -> int:
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
    raise ValueError(f"budget must be an int number of tokens, got {budget!r}")
  budget = int(budget)
  if not 0 <= budget < 2**31:
    raise ValueError(f"budget must lie in [0, 2^31), got {budget}")
  return budget


def _check_kept(nodes: Nodes, budget: int, kept: np.ndarray) -> np.ndarray:
  if not kept.any():  # the first node expanded (a root) does not fit
    roots = nodes.cost[nodes.parent < 0]
    what = (f"the root node ({int(roots[0])} tokens)" if roots.size == 1 else
            f"the first root to expand (roots cost {int(roots.min())}-{int(roots.max())} tokens)")
    raise ValueError(f"budget {budget} is smaller than {what}: nothing can be kept")
  return kept
