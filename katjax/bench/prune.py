"""Entropy pruning benchmark: jit selection time and retained signal vs baselines.

`python -m katjax.bench.prune` prints JSON:
  select_ms        {"1000", "10000", "100000"}: median wall time of the jitted selection
                   (`prune_jit.select_entropy` on padded arrays, after compile) on random trees
  select_cpu_ms    the same runs in process CPU time (the machine may be shared: load_avg)
  retained         {"entropy", "truncation", "random"} -> {"0.25", "0.5", "0.75"}: retained
                   signal sum_kept H (|P| + |N|) / sum_all (DESIGN.md section 3) over the
                   realistic groups of `katjax.testing.trees`, each tree pruned to that fraction
                   of its tokens
  retained_upper_bound  same keys: an upper bound for ANY ancestor-closed selection within
                   the budget (exact tree knapsack with costs rounded down to 25 tokens)
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from katjax.core import prune, prune_jit
from katjax.core.tree import build_tree
from katjax.testing.trees import random_tree, realistic_groups

SIZES = (1000, 10000, 100000)
FRACTIONS = (0.25, 0.5, 0.75)


def main(num_groups: int = 8, repeats: int = 10, seed: int = 0) -> dict:
  ms, cpu = {}, {}
  for n in SIZES:
    ms[str(n)], cpu[str(n)] = time_select(random_tree(n, seed), repeats)
  trees = [build_tree(g) for g in realistic_groups(num_groups, seed=seed)]
  stats = [prune.node_stats(t)[0] for t in trees]
  retained = {s: {str(f): retained_at(stats, trees, f, prune.PruneConfig(selector=s, seed=seed))
                  for f in FRACTIONS} for s in prune.SELECTORS}
  bound = {str(f): _ratio([(_knapsack(st, int(f * t.num_tokens)), float(st.signal.sum()))
                           for st, t in zip(stats, trees)]) for f in FRACTIONS}
  return {"select_ms": ms, "select_cpu_ms": cpu, "retained": retained,
          "retained_upper_bound": bound, "groups": num_groups,
          "tree_tokens": int(sum(t.num_tokens for t in trees)),
          "pieces": int(sum(s.parent.size for s in stats)),
          "load_avg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def time_select(nodes: prune.Nodes, repeats: int):
  """(median wall ms, median CPU ms) of the jitted entropy selection at half the tokens."""
  import jax

  n = nodes.parent.size
  size = prune.padded_size(n)
  pad = lambda a, v: jax.device_put(np.concatenate([a, np.full(size - n, v, a.dtype)]))  # noqa
  args = (pad(nodes.parent, -1), pad(nodes.cost, 0), pad(nodes.entropy, 0),
          pad(nodes.branches, 0), pad(nodes.protected, False), pad(np.ones(n, bool), False),
          np.int32(nodes.cost.sum() // 2), np.float32(0.9), np.bool_(True))
  jax.block_until_ready(prune_jit.select_entropy(*args))  # compile
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(prune_jit.select_entropy(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return round(float(np.median(wall)) * 1e3, 2), round(float(np.median(cpu)) * 1e3, 2)


def retained_at(stats, trees, frac: float, cfg: prune.PruneConfig) -> float:
  """Retained signal over all groups, each pruned to frac of its own tokens."""
  parts = []
  for st, t in zip(stats, trees):
    kept = prune.select(st, max(int(frac * t.num_tokens), int(st.cost[0])), cfg)
    parts.append((float(st.signal[kept].sum()), float(st.signal.sum())))
  return _ratio(parts)


def _ratio(parts) -> float:
  return round(sum(k for k, _ in parts) / max(sum(a for _, a in parts), 1e-30), 4)


def _knapsack(nodes: prune.Nodes, budget: int, unit: int = 25) -> float:
  """Upper bound on the signal an ancestor-closed node set of cost <= budget can keep.

  Exact tree knapsack over costs floor(cost / unit) and capacity floor(budget / unit): any
  feasible set stays feasible after rounding down, so the optimum can only grow.
  """
  if np.sum(nodes.parent < 0) != 1:
    raise ValueError("_knapsack expects a single-root tree")
  cap = budget // unit
  cost = nodes.cost // unit
  n = nodes.parent.size
  neg = -np.inf
  best = np.full((n, cap + 1), neg)  # best[i, c]: i kept, subtree cost exactly c
  for i in range(n):
    if cost[i] <= cap:
      best[i, cost[i]] = nodes.signal[i]
  for i in range(n - 1, 0, -1):  # fold each finished child into its parent
    par = nodes.parent[i]
    merged = best[par].copy()  # the child subtree dropped
    for c in np.flatnonzero(np.isfinite(best[i])):
      merged[c:] = np.maximum(merged[c:], best[par, :cap + 1 - c] + best[i, c])
    best[par] = merged
  return float(np.max(best[0]))


if __name__ == "__main__":
  print(json.dumps(main(), indent=1))
