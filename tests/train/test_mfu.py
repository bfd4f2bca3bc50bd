"""MFU: FLOPs of a step against a hand count on a small config.

The hand count takes N from the initialised parameter arrays (every kernel of a matmul,
plus the head) and the attended pairs from a brute-force double loop over (query, key)
with the interval rule, so neither comes from the formulas under test.
"""

import jax
import numpy as np
import pytest

from katjax import model
from katjax.train import mfu

CFG = model.ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_dim=48, qk_norm=True, tie_embeddings=True)


def _hand_matmul_weights(params) -> int:
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "kernel":
      total += leaf.size
  if "lm_head" not in params:  # the tied head multiplies by the embedding
    total += params["embed"]["embedding"].size
  return total


def _hand_pairs(subtree_end, valid):
  n = 0
  for row_end, row_valid in zip(subtree_end, valid):
    for q in range(len(row_end)):
      for k in range(q + 1):
        n += bool(row_valid[k]) and k <= q < row_end[k]
  return n


def test_step_flops_match_a_hand_count():
  params = model.param_shapes(CFG)
  assert "embed" in params and "embedding" in params["embed"]
  n = _hand_matmul_weights(params)
  assert mfu.matmul_params(CFG) == n
  # row 0: a prefix tree (root 0-2, children 3-5 and 6-7) then 2 padding tokens;
  # row 1: two packed documents of 4 and 6 tokens (causal chains)
  subtree_end = np.array([[8, 8, 8, 6, 6, 6, 8, 8, 9, 10],
                          [4, 4, 4, 4, 10, 10, 10, 10, 10, 10]], np.int32)
  mult = np.array([[2, 2, 2, 1, 1, 1, 1, 1, 0, 0], [1] * 10], np.int32)
  pairs = _hand_pairs(subtree_end, mult > 0)
  # keys of the root see the whole tree (8, 7, 6), each child's keys their own branch
  assert pairs == (8 + 7 + 6) + (3 + 2 + 1) + (2 + 1) + (10 + 21)
  tokens, got_pairs = mfu.batch_counts({"subtree_end": subtree_end, "mult": mult})
  assert float(tokens) == 18 and float(got_pairs) == pairs
  want = 6 * n * 18 + 12 * CFG.n_layers * CFG.n_heads * CFG.dim_per_head * pairs
  assert mfu.step_flops(CFG, tokens, got_pairs) == pytest.approx(want, rel=1e-12)
  # an untied head is its own vocab x d matmul
  untied = CFG.replace(tie_embeddings=False)
  assert mfu.matmul_params(untied) == _hand_matmul_weights(
      model.param_shapes(untied))


def test_meter_reports_mfu_against_the_peak():
  meter = mfu.MfuMeter(CFG, peak=1e9, num_devices=2)
  batch = {"subtree_end": np.array([[1, 2, 3, 4]], np.int32),
           "segment_ids": np.array([[1, 1, 1, 0]], np.int32), "tokens": np.zeros((1, 4))}
  meter.add(batch)
  meter.add(batch)
  flops = 2 * mfu.step_flops(CFG, 3, 3)  # causal chain: each token sees itself only here
  out = meter.take(seconds=4.0)
  assert out["tflops_per_device"] == pytest.approx(flops / 4 / 2 / 1e12)
  assert out["mfu"] == pytest.approx(flops / 4 / 2 / 1e9)
  assert meter.take(1.0)["tflops_per_device"] == 0.0  # taken: the counts start over


def test_peak_table_and_override():
  assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert mfu.peak_flops("TPU v5 lite") == 197e12  # v5e, not v5p's 459e12
  assert mfu.peak_flops("TPU v5") == 459e12
  assert mfu.peak_flops("cpu") is None
  assert mfu.peak_flops("cpu", override=2e12) == 2e12
  with pytest.raises(ValueError, match="peak_flops"):
    mfu.peak_flops("cpu", override=-1.0)
