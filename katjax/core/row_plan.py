"""Rows and trees: one long row per tree, or a tree split over several shorter rows.

A tree row's memory grows with its length (activations of every token), so a memory budget
is a cap on tokens per row. Splitting a tree into parts (subsets of its branches, each a
tree of its own) keeps every branch exact but stores the prefix the parts share once per
part: more tokens and more attended pairs. With an attention kernel that computes about the
visible pairs only (`katjax.model.tile_attention`), FLOPs = per-token cost x tokens +
per-pair cost x visible pairs, and both only grow by splitting; so the FLOP-minimal layout
under the budget keeps every tree that fits whole and splits the others only where the
budget forces it, at the shallowest forks (the least duplicated prefix). `plan_rows` does
that greedily: split at the first fork, re-merge sibling parts first-fit while they fit, and
recurse into a part that is still too long. Then `pack_trees(parts, max_tokens)` fills rows.

The loss is unchanged by the layout: advantages and per-branch normalisers are per
trajectory, and every packed weight (including `denom`) is a sum over the branches through a
token, so any partition of the branches gives the same loss sum, denominator and gradient.
"""

from __future__ import annotations

import numpy as np

from katjax.core.tree import Trajectory, _key, build_tree


def plan_rows(groups, max_tokens: int) -> list:
  """groups: lists of Trajectory -> parts (lists of Trajectory), each one tree of at most
  `max_tokens` tokens; pack them with `pack_trees(parts, max_tokens)`."""
  if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
    raise ValueError(f"plan_rows: max_tokens must be a positive int, got {max_tokens!r}")
  parts = []
  for gi, group in enumerate(groups):
    group = list(group)
    for t in group:
      if not isinstance(t, Trajectory):
        raise ValueError(f"plan_rows: group {gi} holds a {type(t).__name__}, not a Trajectory")
      if len(t) > max_tokens:
        raise ValueError(f"plan_rows: group {gi} has a trajectory of {len(t)} tokens > "
                         f"max_tokens={max_tokens}; a trajectory cannot be split across rows")
    parts += _split(group, max_tokens)
  return parts


def layout_cost(parts) -> dict:
  """Tokens and visible (query, key) pairs of the parts' trees: what a layout computes."""
  trees = [build_tree(p) for p in parts]
  return {"tokens": int(sum(t.num_tokens for t in trees)),
          "pairs": int(sum(int(np.sum(t.positions + 1)) for t in trees)),
          "parts": len(trees)}


def _split(trajs, budget):
  if build_tree(trajs).num_tokens <= budget:
    return [trajs]
  children = _children(trajs)
  if len(children) == 1:  # cannot happen with distinct trajectories longer than the prefix
    raise ValueError("plan_rows: cannot split a group whose trajectories do not fork")
  pieces = []
  for child in children:
    pieces += _split(child, budget)
  # First-fit decreasing re-merge: siblings that fit together share their prefix once.
  pieces.sort(key=lambda p: -build_tree(p).num_tokens)
  merged = []
  for p in pieces:
    for i, m in enumerate(merged):
      if build_tree(m + p).num_tokens <= budget:
        merged[i] = m + p
        break
    else:
      merged.append(p)
  return merged


def _children(trajs):
  """Branch subsets after the first fork (the longest prefix all share), in input order.
  A trajectory that ends at the fork joins the first subset (or is one when only one
  continues)."""
  depth = 0
  while all(len(t) > depth for t in trajs) and len({_key(t, depth) for t in trajs}) == 1:
    depth += 1
  groups, ended = {}, []
  for t in trajs:
    if len(t) > depth:
      groups.setdefault(_key(t, depth), []).append(t)
    else:
      ended.append(t)
  out = list(groups.values())
  if ended and len(out) == 1:  # the fork is between a prefix and its continuations
    return [ended] + out
  out[0] = ended + out[0]
  return out

