"""Eval stage pieces: the Wilson interval against an independent root search, the paired
McNemar test against a binomial tail summed by hand."""

import math

import pytest

from katjax.stages.eval import paired, wilson_interval


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


def test_paired_counts_discordant_tasks_and_gives_the_exact_mcnemar_p():
  # 10 tasks only the first policy solves, 1 only the second, 5 both, 4 neither.
  first = [1] * 10 + [0] + [1] * 5 + [0] * 4
  second = [0] * 10 + [1] + [1] * 5 + [0] * 4
  out = paired(first, second)
  assert (out["only_first"], out["only_second"]) == (10, 1)
  # Two-sided: P(X <= 1) + P(X >= 10) for X ~ Binomial(11, 1/2) = 2 * 12 / 2048.
  assert out["p"] == round(24 / 2048, 4) == 0.0117
  assert paired(second, first) == {"only_first": 1, "only_second": 10, "p": 0.0117}
  assert paired([1, 0], [1, 0])["p"] == 1.0  # no discordant task: no evidence either way
  with pytest.raises(ValueError, match="same tasks"):
    paired([1, 0, 1], [1, 0])


@pytest.fixture(scope="module")
def tiny_policy():
  import jax
  from katjax import model as kmodel
  from katjax.data import lookup
  from katjax.data.bpe import train_bpe
  from katjax.rollout.sampler import Sampler
  tok = train_bpe(lookup.mid_corpus(300), 400)
  cfg = kmodel.ModelConfig(vocab_size=400, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                           ffn_dim=64, dtype="float32", family="qwen3", qk_norm=True,
                           tie_embeddings=True)
  params = kmodel.init(cfg, jax.random.PRNGKey(0))
  return Sampler(cfg, params, max_len=640, tokenizer=tok, max_batch=64), tok


def test_eval_is_deterministic_for_a_seed(tiny_policy):
  import ml_collections
  from katjax.data import lookup
  from katjax.stages.eval import evaluate
  sampler, tok = tiny_policy
  tasks = lookup.generate_tasks(12, "heldout", seed=0)
  rl = ml_collections.ConfigDict(dict(env="lookup", max_turns=2, max_new_tokens=24,
                                      max_tokens=640))
  ev = lambda seed: ml_collections.ConfigDict(dict(seed=seed, temperature=5.0, samples=2))
  # 6 tasks x 2 samples and 12 greedy tasks: one batch shape, one compile.
  a, b = (evaluate(sampler, tok, tasks[:6], ev(3), rl) for _ in range(2))
  assert a == b and a["n_tasks"] == 6 and a["k"] == 2
  assert a["finish_reasons"].get("max_tokens", 0) < 1  # the episodes did generate
  assert abs(sum(a["finish_reasons"].values()) - 1.0) < 1e-9
  greedy = ml_collections.ConfigDict(dict(seed=0, temperature=0.0, samples=5))
  g = evaluate(sampler, tok, tasks, greedy, rl)
  assert g["k"] == 1 and g["n_tasks"] == 12
  assert g == evaluate(sampler, tok, tasks, greedy, rl)


def test_batched_episodes_equal_sequential_ones_with_sampling(tiny_policy):
  """Lock-step batching changes nothing: same seeds, same tokens as one at a time.
  (A hot temperature: the random tiny model's own distribution is too peaked to show
  that the seed matters.)"""
  from katjax.data import lookup
  from katjax.envs.base import make_env
  from katjax.rollout.agent import AgentLimits, run_episode
  from katjax.rollout.batch import episode_seed, run_episodes
  from katjax.rollout.sampler import SamplingParams
  import numpy as np
  sampler, tok = tiny_policy
  tasks = lookup.generate_tasks(3, "heldout", seed=1)
  sp, limits = SamplingParams(temperature=5.0, max_new_tokens=16), AgentLimits(
      max_turns=2, max_tokens=640, max_new_tokens=16)
  batched = run_episodes(sampler, tok, [make_env("lookup") for _ in tasks], tasks, sp,
                         limits, seed=7)
  other = run_episodes(sampler, tok, [make_env("lookup") for _ in tasks], tasks, sp, limits,
                       seed=8)
  assert all(r.num_turns >= 1 for r in batched)
  assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(batched, other))
  for i, (task, got) in enumerate(zip(tasks, batched)):
    want = run_episode(sampler, tok, make_env("lookup"), task, sp, limits,
                       seed=episode_seed(7, i))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
