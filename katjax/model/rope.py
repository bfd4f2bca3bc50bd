"""Rotary position embeddings: theta, half-split or interleaved layout, linear/llama3 scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from katjax.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """float64[D/2] inverse frequencies after the configured scaling (host constants)."""
  d = cfg.dim_per_head
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if cfg.rope_scaling == "linear":
    inv = inv / cfg.rope_scaling_factor
  elif cfg.rope_scaling == "llama3":
    # Llama 3.1: long wavelengths scaled by `factor`, short kept, a smooth ramp between.
    factor, lo, hi = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
    inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv


def apply_rope(x, positions, cfg: ModelConfig):
  """Rotate x float[B, T, H, D] by positions int[B, T]; computed in float32."""
  inv = jnp.asarray(inv_frequencies(cfg), jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  if cfg.rope_layout == "half":
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  else:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
  return out.astype(x.dtype)
