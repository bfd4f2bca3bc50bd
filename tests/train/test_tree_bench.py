"""bench.tree's counts against an independent count of distinct prefixes, on a small group."""

import numpy as np

from katjax.bench import tree as bench_tree

SHAPE = dict(prompt_len=(20, 40), turns=(1, 3), assistant_len=(5, 20), tool_len=(5, 20))


def test_tree_bench_counts_match_distinct_prefixes():
  out = bench_tree.run(1, repeats=1, seed=3, **SHAPE)
  trajectories = bench_tree.realistic_groups(1, seed=3, **SHAPE)[0]
  seqs = [tuple(int(x) for x in t.tokens) for t in trajectories]
  # A prefix tree stores one token per distinct non-empty prefix; that token's depth + 1 is
  # the prefix length, i.e. the number of keys it attends to.
  prefixes = {s[:n] for s in seqs for n in range(1, len(s) + 1)}
  assert out["flat_tokens"] == sum(len(s) for s in seqs)
  assert out["tree_tokens"] == len(prefixes)
  flat_pairs = sum(len(s) * (len(s) + 1) / 2 for s in seqs)
  tree_pairs = sum(len(p) for p in prefixes)
  np.testing.assert_allclose(out["attention_ratio"], flat_pairs / tree_pairs, rtol=1e-12)
  assert out["token_ratio"] > 1.2  # forks share prefixes
  # flop_ratio lies between its two limits: the token ratio and the attention ratio.
  lo, hi = sorted([out["token_ratio"], out["attention_ratio"]])
  assert lo <= out["flop_ratio"] <= hi
  assert out["flat_step_bytes"] > out["tree_step_bytes"] > 0
  assert out["flat_step_s"] > 0 and out["tree_step_s"] > 0
  # The kernel computes tree_tiles tiles of block^2 pairs; the row's visible pairs are the
  # tree's (one per distinct prefix and key) plus each padding token seeing itself.
  rows, size = out["tree_rows"]
  visible = tree_pairs + rows * size - len(prefixes)
  computed = out["tree_tiles"] * out["tree_block"] ** 2
  np.testing.assert_allclose(out["attention_efficiency"], visible / computed, rtol=1e-12)
  assert 0 < out["attention_efficiency"] <= 1
  np.testing.assert_allclose(out["speedup_vs_flop_ratio"], out["speedup"] / out["flop_ratio"])
