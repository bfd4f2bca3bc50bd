"""RFT: rewards relative to ground truth (pure, jit-able; DESIGN.md section 4).

A task carries ground truths (teacher trajectories, gold patches). A rollout is scored by
how it relates to them rather than by an absolute reward:

- `lcs_similarity` / `edit_similarity`: token-level similarity of two padded id sequences,
  in [0, 1], as a dynamic programme over rows (`lax.scan`) with a vectorised row update
  (a cumulative max / min), so memory is one row and the scan length is the padded length
  of the first sequence. `similarity_matrix` vmaps it over rollouts x ground truths.
- `relative_reward`: `max_k sim(o, g_k)`, or `score(o) - max_k score(g_k)` where the
  environment gives test outcomes, mixed with an optional outcome reward.
- `rft_advantages`: the same rewards group-normalised by `grpo_advantages`.

Inputs are checked when they are concrete (ValueError naming the argument); inside `jit`
lengths are clipped to the padded size and a rollout without a valid ground truth gets NaN.
Two empty sequences are identical: both similarities are 1 for them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from katjax.core.advantages import grpo_advantages

__all__ = ["METRICS", "MODES", "lcs_length", "edit_distance", "lcs_similarity",
           "edit_similarity", "similarity_matrix", "RelativeRewardConfig", "relative_reward",
           "rft_advantages"]

METRICS = ("lcs", "edit")
MODES = ("max_similarity", "score_delta")


def lcs_length(a, a_len, b, b_len):
  """int32[]: longest common subsequence of a[:a_len] and b[:b_len] (a int[La], b int[Lb])."""
  a, a_len, b, b_len = _check_pair(a, a_len, b, b_len)
  return _lcs_row(a, a_len, b)[b_len]


def edit_distance(a, a_len, b, b_len):
  """int32[]: Levenshtein distance (unit insert / delete / substitute) of the two prefixes."""
  a, a_len, b, b_len = _check_pair(a, a_len, b, b_len)
  return _levenshtein_row(a, a_len, b)[b_len]


def lcs_similarity(a, a_len, b, b_len):
  """float32[]: 2 * LCS / (a_len + b_len); 1 when both are empty."""
  a, a_len, b, b_len = _check_pair(a, a_len, b, b_len)
  lcs = _lcs_row(a, a_len, b)[b_len].astype(jnp.float32)
  total = (a_len + b_len).astype(jnp.float32)
  return jnp.where(total > 0, 2.0 * lcs / jnp.maximum(total, 1.0), 1.0)


def edit_similarity(a, a_len, b, b_len):
  """float32[]: 1 - Levenshtein / max(a_len, b_len); 1 when both are empty."""
  a, a_len, b, b_len = _check_pair(a, a_len, b, b_len)
  dist = _levenshtein_row(a, a_len, b)[b_len].astype(jnp.float32)
  longest = jnp.maximum(a_len, b_len).astype(jnp.float32)
  return jnp.where(longest > 0, 1.0 - dist / jnp.maximum(longest, 1.0), 1.0)


def similarity_matrix(rollouts, rollout_lens, truths, truth_lens, metric: str = "lcs"):
  """float32[N, K]: sim(rollouts[n, :rollout_lens[n]], truths[k, :truth_lens[k]]).

  rollouts int[N, La], rollout_lens int[N], truths int[K, Lb], truth_lens int[K];
  metric (static) is "lcs" (lcs_similarity) or "edit" (edit_similarity).
  """
  if metric not in METRICS:
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  rollouts, rollout_lens = _check_batch("rollouts", rollouts, rollout_lens)
  truths, truth_lens = _check_batch("truths", truths, truth_lens)
  sim = lcs_similarity if metric == "lcs" else edit_similarity
  over_truths = jax.vmap(sim, in_axes=(None, None, 0, 0))
  return jax.vmap(over_truths, in_axes=(0, 0, None, None))(rollouts, rollout_lens, truths,
                                                           truth_lens)


@dataclasses.dataclass(frozen=True)
class RelativeRewardConfig:
  """How `relative_reward` scores a rollout (static; hashable, so usable as a jit static arg).

  mode: "max_similarity" (values are similarities [N, K]) or "score_delta" (values are the
    rollouts' scores [N], compared with the best ground truth's score).
  outcome_weight: w in [0, 1]; reward = (1 - w) * relative + w * outcome.
  """

  mode: str = "max_similarity"
  outcome_weight: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"RelativeRewardConfig.mode must be one of {MODES}, got {self.mode!r}")
    w = self.outcome_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
        or not 0.0 <= w <= 1.0:
      raise ValueError(f"RelativeRewardConfig.outcome_weight must be a finite number in "
                       f"[0, 1], got {w!r}")


def relative_reward(values, config: RelativeRewardConfig = RelativeRewardConfig(), *,
                    truth_scores=None, truth_mask=None, outcome=None):
  """float32[N]: each rollout's reward relative to its task's ground truths.

  max_similarity: values float[N, K] = sim(o_n, g_k); relative_n = max_k values[n, k].
  score_delta: values float[N] = score(o_n), truth_scores float[K] or [N, K] = score(g_k);
    relative_n = values[n] - max_k truth_scores[n, k].
  truth_mask bool[K] or [N, K] marks the real ground truths (False = padding; default all).
  outcome float[N] (e.g. tests passed) is mixed in by config.outcome_weight; it is required
  when the weight is > 0 and ignored when it is 0.

  Note: within a group of one task, `score_delta` differs from the plain score by a
  constant, which group normalisation (GRPO) removes; it matters for rewards compared or
  thresholded across tasks.
  """
  if not isinstance(config, RelativeRewardConfig):
    raise ValueError(f"config must be a RelativeRewardConfig, got {type(config).__name__}")
  values = jnp.asarray(values, jnp.float32)
  if config.mode == "max_similarity":
    if truth_scores is not None:
      raise ValueError("truth_scores is only used by mode='score_delta'")
    if values.ndim != 2:
      raise ValueError(f"values must be similarities [N, K] in mode 'max_similarity', got "
                       f"shape {values.shape}")
    n, k = values.shape
    mask = _truth_mask(truth_mask, n, k)
    _check_finite("values (similarities)", values, mask)
    relative = _masked_max(values, mask)
  else:
    if values.ndim != 1:
      raise ValueError(f"values must be rollout scores [N] in mode 'score_delta', got shape "
                       f"{values.shape}")
    if truth_scores is None:
      raise ValueError("mode 'score_delta' needs truth_scores (score of each ground truth)")
    truths = jnp.asarray(truth_scores, jnp.float32)
    n = values.shape[0]
    if truths.ndim not in (1, 2) or (truths.ndim == 2 and truths.shape[0] != n):
      raise ValueError(f"truth_scores must be [K] or [N={n}, K], got shape {truths.shape}")
    k = truths.shape[-1]
    truths = jnp.broadcast_to(truths, (n, k))
    mask = _truth_mask(truth_mask, n, k)
    _check_finite("values (scores)", values, None)
    _check_finite("truth_scores", truths, mask)
    relative = values - _masked_max(truths, mask)
  w = config.outcome_weight
  if w == 0:
    return relative
  if outcome is None:
    raise ValueError(f"outcome is required when outcome_weight={w} > 0")
  outcome = jnp.asarray(outcome, jnp.float32)
  if outcome.shape != (n,):
    raise ValueError(f"outcome must be [N={n}], got shape {outcome.shape}")
  _check_finite("outcome", outcome, None)
  return (1.0 - w) * relative + w * outcome


def rft_advantages(values, group_ids, config: RelativeRewardConfig = RelativeRewardConfig(),
                   num_groups: int | None = None, *, normalize_std: bool = True, **kwargs):
  """float32[N]: `grpo_advantages(relative_reward(values, config, **kwargs), group_ids)`."""
  rewards = relative_reward(values, config, **kwargs)
  return grpo_advantages(rewards, group_ids, num_groups, normalize_std=normalize_std)


# --- dynamic programmes ------------------------------------------------------------------------


def _lcs_row(a, a_len, b):
  """int32[Lb + 1]: the last row L[a_len, :] of the LCS table of a[:a_len] against b.

  L[i, j] = max(L[i, j-1], c[j]) with c[j] = L[i-1, j-1] + 1 on a match, else L[i-1, j]
  (on a match c[j] >= L[i, j-1] since neighbours differ by at most 1), so a row is the
  cumulative max of c. Rows i >= a_len leave the row unchanged; columns beyond a prefix
  never influence it, so L[a_len, b_len] can be read off for any b_len.
  """
  row = jnp.zeros(b.shape[0] + 1, jnp.int32)
  (row, _, _), _ = lax.scan(_lcs_step, (row, b, a_len),
                            (jnp.arange(a.shape[0], dtype=jnp.int32), a))
  return row


def _lcs_step(carry, xs):
  # Module level (not a closure) so eager calls hit scan's trace cache.
  prev, b, a_len = carry
  i, ai = xs
  c = jnp.where(b == ai, prev[:-1] + 1, prev[1:])
  new = jnp.concatenate([prev[:1], lax.cummax(c)])
  return (jnp.where(i < a_len, new, prev), b, a_len), None


def _levenshtein_row(a, a_len, b):
  """int32[Lb + 1]: the last row D[a_len, :] of the Levenshtein table of a[:a_len] against b.

  D[i, j] = min(c[j], D[i, j-1] + 1) with c[j] = min(D[i-1, j] + 1, D[i-1, j-1] + [a_i != b_j])
  and c[0] = i, so D[i, j] = j + min_{j' <= j} (c[j'] - j'): a cumulative min.
  """
  cols = jnp.arange(b.shape[0] + 1, dtype=jnp.int32)
  (row, _, _), _ = lax.scan(_levenshtein_step, (cols, b, a_len),
                            (jnp.arange(a.shape[0], dtype=jnp.int32), a))
  return row


def _levenshtein_step(carry, xs):
  prev, b, a_len = carry
  i, ai = xs
  cols = jnp.arange(prev.shape[0], dtype=jnp.int32)
  inner = jnp.minimum(prev[1:] + 1, prev[:-1] + (b != ai).astype(jnp.int32))
  c = jnp.concatenate([(i + 1)[None], inner])
  new = cols + lax.cummin(c - cols)
  return (jnp.where(i < a_len, new, prev), b, a_len), None


# --- checks ------------------------------------------------------------------------------------


def _check_pair(a, a_len, b, b_len):
  a, a_len = _check_seq("a", a, a_len)
  b, b_len = _check_seq("b", b, b_len)
  return a, a_len, b, b_len


def _check_seq(name, seq, length):
  seq = jnp.asarray(seq)
  if seq.ndim != 1:
    raise ValueError(f"{name} must be a 1-D padded id array, got shape {seq.shape}")
  if not jnp.issubdtype(seq.dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer token ids, got dtype {seq.dtype}")
  length = jnp.asarray(length)
  if length.ndim != 0 or not jnp.issubdtype(length.dtype, jnp.integer):
    raise ValueError(f"{name}_len must be an integer scalar, got {length.dtype}{length.shape}")
  if not _traced(length) and not 0 <= int(length) <= seq.shape[0]:
    raise ValueError(f"{name}_len must lie in [0, {seq.shape[0]}] (the padded length), "
                     f"got {int(length)}")
  return seq.astype(jnp.int32), jnp.clip(length.astype(jnp.int32), 0, seq.shape[0])


def _check_batch(name, seqs, lens):
  seqs, lens = jnp.asarray(seqs), jnp.asarray(lens)
  if seqs.ndim != 2:
    raise ValueError(f"{name} must be padded ids [B, L], got shape {seqs.shape}")
  if lens.shape != seqs.shape[:1]:
    raise ValueError(f"{name} has {seqs.shape[0]} rows but its lengths have shape "
                     f"{lens.shape}; they must match")
  if name == "truths" and seqs.shape[0] == 0:
    raise ValueError("truths is empty: a task needs at least one ground truth")
  if not _traced(lens) and lens.size and (int(lens.min()) < 0 or int(lens.max()) > seqs.shape[1]):
    raise ValueError(f"{name} lengths must lie in [0, {seqs.shape[1]}], got "
                     f"[{int(lens.min())}, {int(lens.max())}]")
  return seqs, lens


def _truth_mask(truth_mask, n, k):
  if k == 0:
    raise ValueError("no ground truths (K = 0): a task needs at least one")
  if truth_mask is None:
    return jnp.ones((n, k), bool)
  mask = jnp.asarray(truth_mask)
  if mask.dtype != jnp.bool_ or mask.shape not in ((k,), (n, k)):
    raise ValueError(f"truth_mask must be bool[K={k}] or bool[N={n}, K={k}], got "
                     f"{mask.dtype}{mask.shape}")
  mask = jnp.broadcast_to(mask, (n, k))
  if not _traced(mask) and n and not bool(mask.any(axis=1).all()):
    rows = [int(i) for i in jnp.nonzero(~mask.any(axis=1))[0][:5]]
    raise ValueError(f"rollouts {rows} have no valid ground truth in truth_mask")
  return mask


def _masked_max(x, mask):
  best = jnp.max(jnp.where(mask, x, -jnp.inf), axis=1)
  return jnp.where(mask.any(axis=1), best, jnp.nan)


def _check_finite(name, x, mask):
  if _traced(x) or (mask is not None and _traced(mask)):
    return
  ok = jnp.isfinite(x) if mask is None else (jnp.isfinite(x) | ~mask)
  if not bool(ok.all()):
    raise ValueError(f"{name} contain NaN or inf")


def _traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)
