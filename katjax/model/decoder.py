"""Flax (linen) decoder for the Llama, Qwen2 and Qwen3 families.

Layers are stacked with `nn.scan` (params carry a leading "layers" axis), so compile time
does not grow with depth. Every parameter is declared with logical axis names; the mesh
rules in `katjax.parallel` map them to devices. Attention follows the interval mask of
`katjax.model.attention`; an optional KV cache (stacked [L, B, S, KV, D], carried through
the layer scan and written at `cache_index` per row) serves the sampler with the same module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from katjax.model.attention import attention
from katjax.model.config import ModelConfig
from katjax.model.rope import apply_rope

_INIT = nn.initializers.normal(0.02)


def _param_init(axes):
  return nn.with_logical_partitioning(_INIT, axes)


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, subtree_end, cache, layer, cache_index):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    hd = cfg.dim_per_head

    def proj(name, heads, axes):
      return nn.DenseGeneral((heads, hd), use_bias=cfg.qkv_bias, dtype=dt,
                             param_dtype=jnp.float32, kernel_init=_param_init(axes),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    axes[1:]),
                             name=name)(x)

    q = proj("q", cfg.n_heads, ("embed", "heads", "head_dim"))
    k = proj("k", cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"))
    v = proj("v", cfg.n_kv_heads, ("embed", "kv_heads", "head_dim"))
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, dt, "head_dim", name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, dt, "head_dim", name="k_norm")(k)
    q = apply_rope(q, positions, cfg)
    k = apply_rope(k, positions, cfg)

    if cache is None:
      out = attention(q, k, v, subtree_end, impl=cfg.attention_impl,
                      block=cfg.attention_block, dense_max_len=cfg.dense_max_len)
    else:
      # Decode/prefill: scatter only this chunk's keys into the stacked [L, B, S, ...] cache
      # (the scan carry, updated in place), then attend over this layer's cache slots.
      rows = jnp.arange(x.shape[0])[:, None]
      slots = cache_index[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)
      cache = {
          "k": cache["k"].at[layer, rows, slots].set(k.astype(cache["k"].dtype)),
          "v": cache["v"].at[layer, rows, slots].set(v.astype(cache["v"].dtype)),
      }
      out = attention(q, cache["k"][layer].astype(dt), cache["v"][layer].astype(dt),
                      subtree_end, q_index=slots)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dt,
                          param_dtype=jnp.float32,
                          kernel_init=_param_init(("heads", "head_dim", "embed")),
                          name="o")(out)
    return out, cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype

    def dense(name, features, axes):
      return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                      kernel_init=_param_init(axes), name=name)

    h = nn.silu(dense("gate", cfg.ffn_dim, ("embed", "mlp"))(x))
    h = h * dense("up", cfg.ffn_dim, ("embed", "mlp"))(x)
    return dense("down", cfg.d_model, ("mlp", "embed"))(h)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions, subtree_end, cache_index):
    x, cache, layer = carry
    cfg = self.cfg
    h, cache = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x),
        positions, subtree_end, cache, layer, cache_index)
    x = x + h
    x = x + Mlp(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
    return (x, cache, layer + 1), None


class Decoder(nn.Module):
  """tokens int[B, T] -> logits float32[B, T, V] (and the updated cache when given one)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, subtree_end, cache=None, cache_index=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32,
                     embedding_init=_param_init(("vocab", "embed")), name="embed")
    x = embed(tokens)
    block = Block
    if cfg.remat:
      block = nn.remat(Block, prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                     length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    # The stacked cache rides in the carry so each layer writes its new slots in place.
    (x, new_cache, _), _ = layers(cfg, name="layers")(
        (x, cache, jnp.zeros((), jnp.int32)), positions, subtree_end, cache_index)
    x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x.astype(dt))
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                        kernel_init=_param_init(("embed", "vocab")), name="lm_head")(x)
    return logits.astype(jnp.float32), new_cache
