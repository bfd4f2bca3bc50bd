"""ModelConfig: the static description of a Llama / Qwen2 / Qwen3 decoder.

One frozen dataclass covers the three families; the differences are flags (qkv bias for
Qwen2, per-head q/k RMSNorm for Qwen3, tied embeddings, RoPE layout and scaling). It is
hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

RopeLayout = Literal["half", "interleaved"]
RopeScaling = Literal["none", "linear", "llama3"]
AttentionImpl = Literal["auto", "dense", "blockwise"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder hyper-parameters. Params are float32; `dtype` is the compute dtype."""

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int | None = None  # None: d_model // n_heads
  ffn_dim: int = 128
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_layout: RopeLayout = "half"
  rope_scaling: RopeScaling = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 scaling only
  rope_high_freq_factor: float = 4.0  # llama3 scaling only
  rope_original_max_position: int = 8192  # llama3 scaling only
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype; params stay float32
  remat: bool = False
  # Layers the scan runs per loop iteration (n_layers: fully unrolled). Params stay stacked
  # either way. On CPU a layer scan costs ~10-15% of a small model's step (dynamic slices of the
  # stacked params, stacked gradient updates); unrolling trades that for compile time.
  scan_unroll: int = 1
  attention_impl: AttentionImpl = "auto"
  attention_block: int = 512
  dense_max_len: int = 1024  # "auto" uses dense attention up to this length
  family: str = "llama"  # informational: llama | qwen2 | qwen3

  def __post_init__(self):
    def positive(name):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                 "scan_unroll", "attention_block", "dense_max_len"):
      positive(name)
    if self.head_dim is not None:
      positive("head_dim")
    elif self.d_model % self.n_heads:
      raise ValueError(
          f"ModelConfig.head_dim is None but d_model={self.d_model} is not divisible by "
          f"n_heads={self.n_heads}; set head_dim explicitly")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig.n_heads={self.n_heads} must be divisible by "
          f"n_kv_heads={self.n_kv_heads} (grouped-query attention)")
    if self.rope_layout not in ("half", "interleaved"):
      raise ValueError(f"ModelConfig.rope_layout must be 'half' or 'interleaved', "
                       f"got {self.rope_layout!r}")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"ModelConfig.rope_scaling must be none|linear|llama3, "
                       f"got {self.rope_scaling!r}")
    if self.attention_impl not in ("auto", "dense", "blockwise"):
      raise ValueError(f"ModelConfig.attention_impl must be auto|dense|blockwise, "
                       f"got {self.attention_impl!r}")
    if self.dim_per_head % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.dim_per_head}")
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"ModelConfig.dtype {self.dtype!r} is not a dtype") from e

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings included)."""
    d, h, kv, hd, f, v = (self.d_model, self.n_heads, self.n_kv_heads, self.dim_per_head,
                          self.ffn_dim, self.vocab_size)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else v * d
    return v * d + self.n_layers * layer + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (6N plus attention), for MFU reports."""
    attn = 12 * self.n_layers * self.n_heads * self.dim_per_head * seq_len / 2
    return 6.0 * self.num_params() + attn


TINY = ModelConfig()
