"""Model FLOPs utilisation (MFU): useful training FLOPs per second over the devices' peak.

Useful FLOPs of a step, per valid token and per attended (query, key) pair:

    6 N tokens  +  12 L H Dh pairs

N counts the weights that take part in a matmul per token (attention and MLP projections of
every layer, and the output head; an embedding lookup is no matmul, norms and biases are
negligible): 2 FLOPs per weight forward, 4 backward. Attention does QK^T and PV, 2 Dh FLOPs
each per head and pair forward, 3x that with the backward. `pairs` is what each token
actually attends to under the interval mask (query q sees key k iff k <= q <
subtree_end[k]), so it is sum_k (subtree_end[k] - k) over valid keys: T(T+1)/2 for one
causal row, much less for packed documents and prefix trees. Rematerialisation is not
counted (that would be hardware FLOPs utilisation).

Peaks are dense bf16 FLOP/s per device from the vendors' data sheets; `peak_flops` looks
the device kind up, and a config value (`train.peak_flops`) overrides it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Dense bf16 FLOP/s per device (no sparsity). Keys are matched as substrings of the
# lower-cased `jax.Device.device_kind`; the longest match wins ("tpu v5 lite" over "tpu v5").
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,  # SXM
    "h800": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "l4": 121e12,
}


def peak_flops(device_kind: str | None = None, override: float | None = None) -> float | None:
  """Peak FLOP/s of one device: `override` if > 0, else the table entry for `device_kind`
  (default: this process's first device); None when unknown (e.g. CPU)."""
  if override:
    if override < 0:
      raise ValueError(f"peak_flops must be positive, got {override}")
    return float(override)
  kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
  hits = [k for k in PEAK_FLOPS if k in kind]
  return PEAK_FLOPS[max(hits, key=len)] if hits else None


def matmul_params(cfg) -> int:
  """Weights used in a matmul per token: per layer q, k, v, o and the three MLP projections,
  plus the output head (the tied embedding when tie_embeddings)."""
  d, h, kv, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head, cfg.ffn_dim
  layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
  return cfg.n_layers * layer + cfg.vocab_size * d


def attention_pairs(subtree_end, valid=None) -> jax.Array:
  """float32[]: (query, key) pairs attended under the interval mask. subtree_end: int[..., T];
  valid: bool[..., T] (padding keys excluded; default all)."""
  subtree_end = jnp.asarray(subtree_end)
  idx = jnp.arange(subtree_end.shape[-1], dtype=jnp.float32)
  span = subtree_end.astype(jnp.float32) - idx
  if valid is not None:
    span = jnp.where(valid, span, 0.0)
  return jnp.sum(span)


def step_flops(cfg, tokens: float, pairs: float) -> float:
  """Useful training FLOPs of `tokens` valid tokens attending `pairs` (query, key) pairs."""
  attn = 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head
  return 6.0 * matmul_params(cfg) * float(tokens) + attn * float(pairs)


def batch_counts(batch) -> tuple[jax.Array, jax.Array]:
  """(valid tokens, attended pairs) of a training batch: a tree batch (`mult` > 0 marks real
  tokens) or a packed LM batch (`segment_ids` > 0). Works on global multi-host arrays."""
  if "mult" in batch:
    valid = batch["mult"] > 0
  elif "segment_ids" in batch:
    valid = batch["segment_ids"] > 0
  else:
    valid = jnp.ones(batch["subtree_end"].shape, bool)
  return jnp.sum(valid.astype(jnp.float32)), attention_pairs(batch["subtree_end"], valid)


class MfuMeter:
  """Accumulates a run's useful FLOPs between logs: `add(batch)` each step, `take(seconds)`
  at log time -> {"tflops_per_device", "mfu" (when the peak is known)}.

  The trainer calls it with one line each; counts run as a tiny jitted reduction on the
  (global) batch, so every host sees the same numbers.
  """

  def __init__(self, cfg, peak: float | None = None, num_devices: int | None = None):
    self.cfg = cfg
    self.peak = peak_flops(override=peak)
    self.num_devices = num_devices or jax.device_count()
    self._counts = []
    self._count = jax.jit(batch_counts)

  def add(self, batch) -> None:
    keys = {"subtree_end", "mult", "segment_ids"}
    self._counts.append(self._count({k: v for k, v in batch.items() if k in keys}))

  def take(self, seconds: float) -> dict:
    flops = sum(step_flops(self.cfg, float(t), float(p)) for t, p in self._counts)
    self._counts = []
    per_device = flops / max(seconds, 1e-9) / self.num_devices
    out = {"tflops_per_device": per_device / 1e12}
    if self.peak:
      out["mfu"] = per_device / self.peak
    return out
