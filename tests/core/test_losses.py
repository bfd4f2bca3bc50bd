"""Tree policy loss == sum of per-branch flat losses (value and gradient), logprob gather,
group advantages. The flat side is a plain per-branch, per-token implementation of PPO /
DAPO / dual clip / TIS / KL written from the formulas, not from the tree factorisation.

The "model" here is a table theta indexed by a hash of the token's whole prefix, so logp
depends on the full context (as a real LM's does) and gradients w.r.t. theta check that
shared tokens accumulate every branch's gradient. The real decoder is checked in
tests/train/test_tree_step.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from katjax.testing.trees import random_group
from katjax.core.advantages import grpo_advantages, rloo_advantages
from katjax.core.losses import PolicyLossConfig, summarize, token_logprobs, tree_policy_loss
from katjax.core.tree_pack import pack_trees

M = 1009  # table size of the toy "model"
S = 64  # tokens per packed row
ROWS = 4
CONFIGS = {
    "ppo": PolicyLossConfig(),
    "dapo_dual_tis_k3": PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                                         kl_coef=0.1, kl_type="k3", tis_cap=2.0),
    "k1_tis": PolicyLossConfig(eps_low=0.1, eps_high=0.1, kl_coef=0.05, kl_type="k1",
                               tis_cap=0.8),
}


def _prefix_hashes(tokens, parent):
  """int[..]: hash of the token's whole prefix, following `parent` (-1 = no prefix)."""
  h = np.zeros(tokens.shape, np.int64)
  for i in range(tokens.size):
    prev = h[parent[i]] if parent[i] >= 0 else 7
    h[i] = hash((int(prev), int(tokens[i]))) % M
  return h


def _logp(theta, h):
  return -jax.nn.softplus(theta[h])


@functools.partial(jax.jit, static_argnames="cfg")
def _tree_loss(theta, theta_old, theta_ref, h, batch, cfg):
  def f(th):
    has = batch["parent"] >= 0
    logp = jnp.where(has, _logp(th, h), 0.0)
    b = dict(batch, ref_logp=_logp(theta_ref, h))
    loss_sum, m = tree_policy_loss(logp, _logp(theta_old, h), b, cfg)
    return loss_sum / m["denom"], m
  return jax.value_and_grad(f, has_aux=True)(theta)


@functools.partial(jax.jit, static_argnames="cfg")
def _flat_loss(theta, theta_old, theta_ref, flat, cfg):
  """Mean over the flat branches, from the per-branch, per-token formulas (value, grad).

  flat: h, mask, rollout [NB, L] (one padded row per branch, mask 0 on padding and on
  token 0, which is never predicted), adv [NB]; the normalisation as per-branch weights
  w [NB] and a denominator, computed from the trajectories by `_flat_arrays`.
  """
  def f(th):
    h, mask, a = flat["h"], flat["mask"], flat["adv"][:, None]
    logp, old = _logp(th, h), _logp(theta_old, h)
    ratio = jnp.exp(logp - old)
    obj = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    if cfg.dual_clip is not None:
      obj = jnp.where(a < 0, jnp.maximum(obj, cfg.dual_clip * a), obj)
    if cfg.tis_cap is not None:
      obj = obj * jnp.minimum(jnp.exp(old - flat["rollout"]), cfg.tis_cap)
    loss = -obj
    if cfg.kl_coef:
      log_r = _logp(theta_ref, h) - logp
      kl = -log_r if cfg.kl_type == "k1" else jnp.exp(log_r) - log_r - 1
      loss = loss + cfg.kl_coef * kl
    return jnp.sum(flat["w"] * jnp.sum(mask * loss, axis=1)) / flat["denom"]
  return jax.value_and_grad(f)(theta)


def _flat_arrays(trajs, n_branches, length, norm):
  out = {"h": np.zeros((n_branches, length), np.int32),
         "mask": np.zeros((n_branches, length), np.float32),
         "rollout": np.zeros((n_branches, length), np.float32),
         "adv": np.zeros(n_branches, np.float32)}
  for b, t in enumerate(trajs):
    n = len(t)
    out["h"][b, :n] = _prefix_hashes(t.tokens, np.arange(n) - 1)
    out["mask"][b, 1:n] = t.loss_mask[1:]
    out["rollout"][b, :n] = t.logprobs
    out["adv"][b] = t.advantage
  n = out["mask"].sum(axis=1)
  real = np.arange(n_branches) < len(trajs)
  if norm == "seq-mean-token-mean":
    out["w"] = np.where(n > 0, 1.0 / np.maximum(n, 1), 0.0)
  else:
    out["w"] = real.astype(np.float32)
  out["denom"] = np.float32(n.sum() if norm == "token-mean" else np.sum(n > 0))
  return {k: jnp.asarray(v, jnp.float32 if k != "h" else jnp.int32) for k, v in out.items()}


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1),
       st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
def test_tree_loss_and_grad_equal_flat_sum(seed, norm):
  rng = np.random.default_rng(seed)
  groups = [random_group(rng, vocab_size=5, branches=int(rng.integers(2, 7)), group_id=g)
            for g in range(3)]  # vocab 5: many identical prefixes, deep sharing
  batch = pack_trees(groups, S, norm=norm, num_rows=ROWS)
  h_tree = np.stack([_prefix_hashes(batch.tokens[r], batch.parent[r]) for r in range(ROWS)])
  trajs = [t for g in groups for t in g]
  flat = _flat_arrays(trajs, 18, S, norm)
  keys = jax.random.split(jax.random.PRNGKey(seed % 1000), 3)
  theta = jax.random.normal(keys[0], (M,))
  theta_old = theta + 0.3 * jax.random.normal(keys[1], (M,))  # ratios well outside the clip
  theta_ref = theta + 0.5 * jax.random.normal(keys[2], (M,))
  arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
  for name, cfg in CONFIGS.items():  # norm only changes the packed weights, not the code
    (loss, metrics), grad = _tree_loss(theta, theta_old, theta_ref, jnp.asarray(h_tree),
                                       arrays, cfg)
    ref_loss, ref_grad = _flat_loss(theta, theta_old, theta_ref, flat, cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7, err_msg=name)
    err = jnp.linalg.norm(grad - ref_grad) / jnp.maximum(jnp.linalg.norm(ref_grad), 1e-12)
    assert err <= 1e-5, (name, float(err))
    assert float(metrics["flat_tokens"]) == sum(len(t) for t in trajs)
    assert float(metrics["trained_tokens"]) == sum(t.loss_mask.sum() for t in trajs)
  assert float(summarize(metrics)["token_ratio"]) >= 1.0


def test_clip_fraction_counts_flat_tokens():
  # One shared trained token under a positive and a negative branch, ratio 1.5 > 1 + eps.
  batch = {"pos_weight": jnp.array([[0.0, 2.0]]), "neg_weight": jnp.array([[0.0, -1.0]]),
           "kl_weight": jnp.array([[0.0, 2.0]]), "count": jnp.array([[0.0, 2.0]]),
           "pos_count": jnp.array([[0.0, 1.0]]), "neg_count": jnp.array([[0.0, 1.0]]),
           "mult": jnp.array([[2, 2]]), "denom": jnp.array([[0.0, 2.0]])}
  logp, old = jnp.array([[0.0, np.log(1.5)]]), jnp.zeros((1, 2))
  loss, m = tree_policy_loss(logp, old, batch, PolicyLossConfig())
  assert float(m["clipped_tokens"]) == 1.0  # only the positive branch is clipped
  # Positive branch: -min(1.5 * 2, 1.2 * 2); negative: -max(1.5 * -1, 1.2 * -1) = 1.5 * 1.
  np.testing.assert_allclose(loss, -2.4 + 1.5, rtol=1e-6)


def test_token_logprobs_parent_gather():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
  parent = np.array([[-1, 0, 1, 1, 3, -1], [-1, 0, 0, 0, 2, 4]], np.int32)
  logp, ent = token_logprobs(jnp.asarray(logits), {"tokens": tokens, "parent": parent})
  for r in range(2):
    for i in range(6):
      if parent[r, i] < 0:
        assert logp[r, i] == 0 and ent[r, i] == 0
        continue
      z = logits[r, parent[r, i]].astype(np.float64)
      lsm = z - np.log(np.exp(z - z.max()).sum()) - z.max()
      np.testing.assert_allclose(logp[r, i], lsm[tokens[r, i]], rtol=1e-5)
      np.testing.assert_allclose(ent[r, i], -(np.exp(lsm) * lsm).sum(), rtol=1e-5)


def test_group_advantages_match_loops():
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=12)
  groups = rng.integers(0, 3, 12)
  grpo, grpo_c = grpo_advantages(rewards, groups), grpo_advantages(rewards, groups,
                                                                    normalize_std=False)
  rloo = rloo_advantages(rewards, groups)
  for i in range(12):
    g = rewards[groups == groups[i]]
    np.testing.assert_allclose(grpo_c[i], rewards[i] - g.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grpo[i], (rewards[i] - g.mean()) / (g.std() + 1e-6),
                               rtol=1e-4, atol=1e-5)
    others = g.sum() - rewards[i]
    want = rewards[i] - others / (g.size - 1) if g.size > 1 else 0.0
    np.testing.assert_allclose(rloo[i], want, rtol=1e-5, atol=1e-6)
  assert jnp.all(grpo_advantages(jnp.ones(4), jnp.zeros(4, jnp.int32)) == 0)
  jitted = jax.jit(grpo_advantages, static_argnums=2)(rewards, groups, 3)
  np.testing.assert_allclose(jitted, grpo, rtol=1e-6)


def test_bad_config_and_inputs():
  with pytest.raises(ValueError, match="dual_clip"):
    PolicyLossConfig(dual_clip=0.5)
  with pytest.raises(ValueError, match="kl_type"):
    PolicyLossConfig(kl_type="k2")
  with pytest.raises(ValueError, match="norm"):
    PolicyLossConfig(norm="mean")
  with pytest.raises(ValueError, match="NaN"):
    grpo_advantages(jnp.array([1.0, jnp.nan]), jnp.array([0, 0]))
  with pytest.raises(ValueError, match="group_ids"):
    rloo_advantages(jnp.ones(3), jnp.array([0, 1, 5]), 2)
  batch = pack_trees([random_group(np.random.default_rng(0))], 64).arrays()
  z = jnp.zeros(batch["tokens"].shape)
  with pytest.raises(ValueError, match="ref_logp"):
    tree_policy_loss(z, z, batch, PolicyLossConfig(kl_coef=0.1))
