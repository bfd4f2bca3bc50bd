"""Tree-structured policy loss (pure, jit-able): exact per-branch PPO/GRPO on a prefix tree.

Branch b has advantage A_b, normaliser w_b and mask m_b(t). With r_t = exp(logp_t - old_t)
and c(r) = clip(r, 1 - eps_low, 1 + eps_high) (DESIGN.md section 2):

    sum_b w_b m_b(t) min(r_t A_b, c(r_t) A_b) = P_t min(r_t, c(r_t)) + N_t max(r_t, c(r_t))

with P_t / N_t the sums of w_b m_b(t) A_b over positive / negative advantages (precomputed
by `PrefixTree.token_weights` / `pack_trees`). Dual clip caps only the negative side
(N_t min(max(r, c(r)), C)); the truncated importance weight min(exp(old - rollout), cap)
and the KL to a reference depend only on the token. So one pass over the T tree tokens
computes the same loss, and the same gradient, as the sum over the flat branches.

The loss is returned as a SUM over tokens plus its denominator (`metrics["denom"]`): the
train step divides by the total denominator, so micro-batching is exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from katjax.core.tree import NORMS


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """Static policy-loss options (hashable: pass it as a static argument).

  eps_low / eps_high: PPO clip range [1 - eps_low, 1 + eps_high] (DAPO: asymmetric, e.g.
  0.2 / 0.28). dual_clip: C > 1 caps the loss of negative-advantage tokens at -C A (None:
  off). kl_coef, kl_type ("k1" | "k3"): penalty beta * KL(policy || reference) per token,
  needs batch["ref_logp"]. tis_cap: truncated importance weight min(pi_old / pi_rollout,
  cap) against the sampler's logprobs (None: off). norm: how `pack_trees` built the
  weights (token-mean | seq-mean-token-mean | seq-mean-token-sum).
  """

  eps_low: float = 0.2
  eps_high: float = 0.2
  dual_clip: float | None = None
  kl_coef: float = 0.0
  kl_type: str = "k3"
  tis_cap: float | None = None
  norm: str = "token-mean"

  def __post_init__(self):
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
      raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, "
                       f"{self.eps_high}")
    if self.dual_clip is not None and self.dual_clip <= 1:
      raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
    if self.kl_type not in ("k1", "k3"):
      raise ValueError(f"kl_type must be 'k1' or 'k3', got {self.kl_type!r}")
    if self.kl_coef < 0:
      raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
    if self.tis_cap is not None and self.tis_cap <= 0:
      raise ValueError(f"tis_cap must be > 0 (or None), got {self.tis_cap}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


def token_logprobs(logits, batch):
  """logits float[R, S, V]; batch parent, tokens int32[R, S] -> (logp, entropy) float32[R, S].

  logp[i] = log_softmax(logits[parent[i]])[tokens[i]]: the parent gather, so a branch
  point's last token predicts the first token of every child. entropy[i] is the entropy of
  that same predicting distribution. Both are 0 where parent < 0 (roots, padding).
  """
  logits = logits.astype(jnp.float32)
  r, s, v = logits.shape
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse[..., None])
  ent = lse - jnp.sum(probs * logits, axis=-1)
  parent = batch["parent"]
  has = parent >= 0
  src = jnp.where(has, parent, 0)
  # Gather logits[r, parent[i], tokens[i]] through a flat index: never materialises a
  # second [R, S, V] array.
  flat = jnp.take_along_axis(logits.reshape(r, s * v), src * v + batch["tokens"], axis=1)
  logp = flat - jnp.take_along_axis(lse, src, axis=1)
  entropy = jnp.take_along_axis(ent, src, axis=1)
  return jnp.where(has, logp, 0.0), jnp.where(has, entropy, 0.0)


def tree_policy_loss(logp, old_logp, batch, cfg: PolicyLossConfig, entropy=None):
  """logp, old_logp float32[R, S] (tree form) -> (loss_sum float32[], metrics: dict of sums).

  batch: pos_weight, neg_weight, kl_weight, count, pos_count, neg_count, mult, denom
  (from `TreeBatch.arrays()`), plus logprobs (the sampler's) if cfg.tis_cap and ref_logp if
  cfg.kl_coef. old_logp is treated as a constant. Metrics are sums, so they add up over
  micro-batches (`summarize` turns them into means): denom, trained_tokens,
  clipped_tokens, approx_kl_sum (k3 of old -> new), kl_ref_sum, entropy_sum,
  tree_tokens, flat_tokens.
  """
  f32 = jnp.float32
  p, n, k = (batch[x].astype(f32) for x in ("pos_weight", "neg_weight", "kl_weight"))
  count = batch["count"].astype(f32)
  old_logp = jax.lax.stop_gradient(old_logp)
  active = (count > 0) | (k != 0)
  # Masked before exp so padding can never produce inf * 0 = NaN (values or gradients).
  log_ratio = jnp.where(active, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  f_pos = jnp.minimum(ratio, clipped)
  f_neg = jnp.maximum(ratio, clipped)
  if cfg.dual_clip is not None:
    f_neg = jnp.minimum(f_neg, cfg.dual_clip)
  pg = -(p * f_pos + n * f_neg)
  if cfg.tis_cap is not None:
    gap = jnp.where(active, old_logp - batch["logprobs"].astype(f32), 0.0)
    pg = pg * jnp.exp(jnp.minimum(gap, jnp.log(cfg.tis_cap)))
  per_token = pg
  kl_ref = jnp.zeros_like(logp)
  if cfg.kl_coef:
    if "ref_logp" not in batch:
      raise ValueError("kl_coef > 0 needs batch['ref_logp'] (reference logprobs, tree form)")
    kl_ref = _kl(logp, batch["ref_logp"].astype(f32), active, cfg.kl_type)
    per_token = per_token + cfg.kl_coef * k * kl_ref
  loss_sum = jnp.sum(per_token)
  sg = jax.lax.stop_gradient
  is_clipped = (batch["pos_count"] * (ratio > 1.0 + cfg.eps_high)
                + batch["neg_count"] * (ratio < 1.0 - cfg.eps_low))
  metrics = {
      "denom": jnp.sum(batch["denom"].astype(f32)),
      "trained_tokens": jnp.sum(count),
      "clipped_tokens": sg(jnp.sum(is_clipped.astype(f32))),
      "approx_kl_sum": sg(jnp.sum(count * (ratio - 1.0 - log_ratio))),
      "kl_ref_sum": sg(jnp.sum(count * kl_ref)),
      "entropy_sum": sg(jnp.sum(count * (0.0 if entropy is None else entropy))),
      "tree_tokens": jnp.sum((batch["mult"] > 0).astype(f32)),
      "flat_tokens": jnp.sum(batch["mult"].astype(f32)),
  }
  return loss_sum, metrics


def summarize(metrics: dict) -> dict:
  """Means from summed metrics: clip_frac, approx_kl, kl_ref, entropy, token_ratio."""
  trained = jnp.maximum(metrics["trained_tokens"], 1.0)
  return {"clip_frac": metrics["clipped_tokens"] / trained,
          "approx_kl": metrics["approx_kl_sum"] / trained,
          "kl_ref": metrics["kl_ref_sum"] / trained,
          "entropy": metrics["entropy_sum"] / trained,
          "token_ratio": metrics["flat_tokens"] / jnp.maximum(metrics["tree_tokens"], 1.0)}


def _kl(logp, ref_logp, active, kind):
  """Per-token estimate of KL(policy || reference) from samples of the policy."""
  d = jnp.where(active, ref_logp - logp, 0.0)
  if kind == "k1":
    return -d
  return jnp.exp(d) - d - 1.0
