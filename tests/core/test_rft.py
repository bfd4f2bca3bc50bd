"""RFT rewards (katjax/core/rft.py): DP similarities against plain-Python DPs, reward modes
against hand-derived cases, and clear errors for bad input."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from katjax.core import rft

PAD = 48  # every hypothesis example is padded to this, so each jitted function compiles once
SETTINGS = settings(max_examples=40, deadline=None)
JIT = {name: jax.jit(getattr(rft, name)) for name in
       ("lcs_length", "edit_distance", "lcs_similarity", "edit_similarity")}
MATRIX = {m: jax.jit(rft.similarity_matrix, static_argnames="metric") for m in rft.METRICS}

# Small alphabets make matches common.
seqs = st.lists(st.integers(0, 3), min_size=0, max_size=40)


def levenshtein_ref(a, b):
  prev = list(range(len(b) + 1))
  for i in range(1, len(a) + 1):
    cur = [i] + [0] * len(b)
    for j in range(1, len(b) + 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
    prev = cur
  return prev[-1]


def padded(seq, size=PAD, junk=7):
  out = np.full(size, junk, np.int32)
  out[:len(seq)] = seq
  return out


@SETTINGS
@given(seqs, seqs, st.integers(0, 4), st.integers(0, 4))
def test_dp_matches_plain_python_reference(lcs_ref, a, b, junk_a, junk_b):
  # Junk ids inside the alphabet: padding that leaked into the DP would change the result.
  pa, pb = padded(a, junk=junk_a), padded(b, junk=junk_b)
  lcs, dist = lcs_ref(a, b), levenshtein_ref(a, b)
  assert int(JIT["lcs_length"](pa, len(a), pb, len(b))) == lcs
  assert int(JIT["edit_distance"](pa, len(a), pb, len(b))) == dist
  total, longest = len(a) + len(b), max(len(a), len(b))
  expect_lcs_sim = 2 * lcs / total if total else 1.0
  expect_edit_sim = 1 - dist / longest if longest else 1.0
  assert float(JIT["lcs_similarity"](pa, len(a), pb, len(b))) == pytest.approx(expect_lcs_sim,
                                                                               abs=1e-6)
  assert float(JIT["edit_similarity"](pa, len(a), pb, len(b))) == pytest.approx(
      expect_edit_sim, abs=1e-6)


@settings(max_examples=20, deadline=None)
@given(seqs, seqs)
def test_jit_equals_no_jit(a, b):
  pa, pb = padded(a), padded(b)
  for name, fn in JIT.items():
    eager = getattr(rft, name)(pa, len(a), pb, len(b))
    assert np.asarray(fn(pa, len(a), pb, len(b))) == np.asarray(eager), name


@settings(max_examples=10, deadline=None)
@given(st.lists(seqs, min_size=3, max_size=3), st.lists(seqs, min_size=2, max_size=2))
def test_batched_equals_unbatched(rollouts, truths):
  outs, out_lens = np.stack([padded(s) for s in rollouts]), np.array([len(s) for s in rollouts])
  gts, gt_lens = np.stack([padded(s) for s in truths]), np.array([len(s) for s in truths])
  for metric, single in (("lcs", "lcs_similarity"), ("edit", "edit_similarity")):
    got = np.asarray(MATRIX[metric](outs, out_lens, gts, gt_lens, metric=metric))
    assert got.shape == (3, 2)
    for n in range(3):
      for k in range(2):
        assert got[n, k] == float(JIT[single](outs[n], out_lens[n], gts[k], gt_lens[k]))


def test_unpadded_and_zero_size_arrays():
  empty = np.zeros(0, np.int32)
  assert int(rft.lcs_length(empty, 0, empty, 0)) == 0
  assert float(rft.lcs_similarity(empty, 0, empty, 0)) == 1.0
  assert float(rft.edit_similarity(empty, 0, empty, 0)) == 1.0
  b = np.array([5, 6, 7])
  assert int(rft.edit_distance(empty, 0, b, 3)) == 3
  assert int(rft.edit_distance(b, 3, empty, 0)) == 3
  assert float(rft.lcs_similarity(b, 3, empty, 0)) == 0.0
  # Different padded lengths on the two sides.
  a = np.array([1, 5, 6, 2, 7, 0, 0, 0, 0])
  assert int(rft.lcs_length(a, 5, b, 3)) == 3
  assert int(rft.edit_distance(a, 5, b, 3)) == 2


def test_reward_max_similarity_hand_cases():
  sims = np.array([[0.2, 0.9, 0.4], [0.5, 0.1, 0.3]])
  np.testing.assert_allclose(rft.relative_reward(sims), [0.9, 0.5])
  # The best ground truth of rollout 0 is padding: it must not count.
  mask = np.array([True, False, True])
  np.testing.assert_allclose(rft.relative_reward(sims, truth_mask=mask), [0.4, 0.5])
  per_row = np.array([[True, True, False], [False, False, True]])
  np.testing.assert_allclose(rft.relative_reward(sims, truth_mask=per_row), [0.9, 0.3])
  # 0.25 * outcome + 0.75 * max sim.
  cfg = rft.RelativeRewardConfig(outcome_weight=0.25)
  np.testing.assert_allclose(rft.relative_reward(sims, cfg, outcome=[1.0, 0.0]),
                             [0.75 * 0.9 + 0.25, 0.75 * 0.5], rtol=1e-6)


def test_reward_score_delta_hand_cases():
  cfg = rft.RelativeRewardConfig(mode="score_delta")
  # Ground truths pass 3 and 5 of 6 tests: rollouts are measured against the best (5).
  np.testing.assert_allclose(rft.relative_reward([6.0, 5.0, 1.0], cfg, truth_scores=[3.0, 5.0]),
                             [1.0, 0.0, -4.0])
  np.testing.assert_allclose(
      rft.relative_reward([6.0, 5.0], cfg, truth_scores=[[3.0, 5.0], [4.0, 9.0]],
                          truth_mask=np.array([[True, True], [True, False]])), [1.0, 1.0])
  mixed = rft.RelativeRewardConfig(mode="score_delta", outcome_weight=0.5)
  np.testing.assert_allclose(rft.relative_reward([2.0], mixed, truth_scores=[3.0],
                                                 outcome=[1.0]), [0.0])


def test_advantages_are_grpo_of_relative_rewards():
  sims = np.array([[0.1, 0.3], [0.8, 0.2], [0.5, 0.5], [0.4, 0.0]])
  groups = np.array([0, 0, 1, 1])
  got = np.asarray(rft.rft_advantages(sims, groups, num_groups=2))
  # Row maxima by hand: 0.3, 0.8 | 0.5, 0.4. Two rollouts per group: centred rewards are
  # -+0.25 and +-0.05, the population std 0.25 and 0.05, so advantages are +-1 up to eps.
  expect = [-(0.25 / (0.25 + 1e-6)), 0.25 / (0.25 + 1e-6), 0.05 / (0.05 + 1e-6),
            -(0.05 / (0.05 + 1e-6))]
  np.testing.assert_allclose(got, expect, rtol=1e-4)


def test_jit_reward_and_no_valid_truth_gives_nan_under_jit():
  cfg = rft.RelativeRewardConfig(outcome_weight=0.5)
  fn = jax.jit(rft.relative_reward, static_argnums=1)
  sims = np.array([[0.2, 0.6], [0.4, 0.1]])
  np.testing.assert_allclose(fn(sims, cfg, outcome=np.array([0.0, 1.0])), [0.3, 0.7],
                             rtol=1e-6)
  mask = np.array([[True, False], [False, False]])
  got = np.asarray(fn(sims, rft.RelativeRewardConfig(), truth_mask=mask))
  assert got[0] == pytest.approx(0.2) and math.isnan(got[1])


@pytest.mark.parametrize("call, match", [
  (lambda: rft.lcs_length(np.arange(4), -1, np.arange(4), 2), "a_len must lie in"),
  (lambda: rft.edit_distance(np.arange(4), 2, np.arange(4), 5), "b_len must lie in"),
  (lambda: rft.lcs_similarity(np.zeros((2, 2), np.int32), 1, np.arange(4), 2), "1-D"),
  (lambda: rft.lcs_length(np.arange(4.0), 1, np.arange(4), 2), "integer token ids"),
  (lambda: rft.similarity_matrix(np.zeros((2, 4), np.int32), np.array([1, 2, 3]),
                                 np.zeros((1, 4), np.int32), np.array([1])), "must match"),
  (lambda: rft.similarity_matrix(np.zeros((2, 4), np.int32), np.array([1, -2]),
                                 np.zeros((1, 4), np.int32), np.array([1])), "lengths must"),
  (lambda: rft.similarity_matrix(np.zeros((2, 4), np.int32), np.array([1, 2]),
                                 np.zeros((0, 4), np.int32), np.zeros(0, int)), "truths is empty"),
  (lambda: rft.similarity_matrix(np.zeros((1, 4), np.int32), np.array([1]),
                                 np.zeros((1, 4), np.int32), np.array([1]), "cosine"), "metric"),
  (lambda: rft.relative_reward(np.zeros((3, 0))), "no ground truths"),
  (lambda: rft.relative_reward(np.array([[0.1, np.nan]])), "NaN"),
  (lambda: rft.relative_reward(np.zeros(3)), r"similarities \[N, K\]"),
  (lambda: rft.relative_reward(np.zeros((2, 2)), truth_mask=np.array([[True, True],
                                                                      [False, False]])),
   r"rollouts \[1\] have no valid ground truth"),
  (lambda: rft.relative_reward(np.zeros((2, 2)), truth_mask=np.array([1, 1])), "truth_mask"),
  (lambda: rft.relative_reward([1.0, np.nan], rft.RelativeRewardConfig("score_delta"),
                               truth_scores=[1.0]), "NaN"),
  (lambda: rft.relative_reward([1.0], rft.RelativeRewardConfig("score_delta"),
                               truth_scores=[np.inf]), "truth_scores contain NaN"),
  (lambda: rft.relative_reward([1.0], rft.RelativeRewardConfig("score_delta")),
   "needs truth_scores"),
  (lambda: rft.relative_reward([1.0, 2.0], rft.RelativeRewardConfig("score_delta"),
                               truth_scores=np.zeros((3, 1))), "truth_scores must be"),
  (lambda: rft.relative_reward(np.zeros((2, 1)), truth_scores=[1.0]), "only used by"),
  (lambda: rft.relative_reward(np.zeros((2, 1)), rft.RelativeRewardConfig(outcome_weight=0.5)),
   "outcome is required"),
  (lambda: rft.relative_reward(np.zeros((2, 1)), rft.RelativeRewardConfig(outcome_weight=0.5),
                               outcome=[1.0]), r"outcome must be \[N=2\]"),
  (lambda: rft.relative_reward(np.zeros((2, 1)), rft.RelativeRewardConfig(outcome_weight=0.5),
                               outcome=[1.0, np.nan]), "outcome contain NaN"),
  (lambda: rft.RelativeRewardConfig(mode="absolute"), "RelativeRewardConfig.mode"),
  (lambda: rft.RelativeRewardConfig(outcome_weight=1.5), "RelativeRewardConfig.outcome_weight"),
  (lambda: rft.RelativeRewardConfig(outcome_weight=float("nan")), "outcome_weight"),
  (lambda: rft.relative_reward(np.zeros((1, 1)), "max_similarity"), "RelativeRewardConfig"),
])
def test_bad_input_raises_clear_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
