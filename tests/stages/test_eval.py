"""Eval stage pieces: the Wilson interval against an independent root search."""

import math

import pytest

from katjax.stages.eval import wilson_interval


def _wilson_by_bisection(k, n, z=1.959963985):
  """The interval's ends are the p where |k/n - p| = z * sqrt(p (1 - p) / n)."""
  f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n
  def root(lo, hi):
    for _ in range(200):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if (f(lo) > 0) == (f(mid) > 0) else (lo, mid)
    return (lo + hi) / 2
  phat = k / n
  lo = 0.0 if k == 0 else root(0.0, phat)
  hi = 1.0 if k == n else root(phat, 1.0)
  return lo, hi


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (50, 100), (99, 100), (200, 200), (37, 200)])
def test_wilson_interval_matches_root_search(k, n):
  lo, hi = wilson_interval(k, n)
  want = _wilson_by_bisection(k, n)
  assert math.isclose(lo, want[0], abs_tol=1e-7) and math.isclose(hi, want[1], abs_tol=1e-7)
  assert lo <= k / n <= hi
