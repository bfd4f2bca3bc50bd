"""Flax (linen) decoder for the Llama, Qwen2 and Qwen3 families.

Layers are stacked with `nn.scan` (params carry a leading "layers" axis), so compile time
does not grow with depth (`cfg.scan_unroll` unrolls it for small models on CPU). Every
parameter is declared with logical axis names; the mesh rules in `katjax.parallel` map them
to devices. Attention follows the interval mask of `katjax.model.attention`. `decode` runs
the same blocks with a KV cache for the sampler: the layers unrolled over per-layer params
and per-layer caches (see its docstring for why).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from katjax.model.attention import attention
from katjax.model.config import ModelConfig
from katjax.model.decode_attention import cached_attention, write_cache
from katjax.model.ring_attention import sequence_size
from katjax.model.rope import apply_rope
from katjax.parallel.mesh import logical_sharding

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
  mesh: Any = None  # a Mesh with sequence > 1: ring attention over that axis

  @nn.compact
  def __call__(self, x, positions, subtree_end, cache, cache_index, tiles=None):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    hd = cfg.dim_per_head

    b, t = x.shape[:2]
    rows = _rows(x)

    def proj(name, heads, axes):
      y = nn.DenseGeneral((heads, hd), use_bias=cfg.qkv_bias, dtype=dt,
                          param_dtype=jnp.float32, kernel_init=_param_init(axes),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 axes[1:]),
                          name=name)(rows)
      return y.reshape(b, t, heads, hd)

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
                      block=cfg.attention_block, dense_max_len=cfg.dense_max_len,
                      tiles=tiles, mesh=self.mesh)
    else:
      # Prefill/decode: write this chunk's keys at cache_index per row, then attend over this
      # layer's cache (subtree_end is unused: every slot up to the query's own is visible).
      cache = write_cache(cache, k, v, cache_index)
      slots = cache_index[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)
      out = cached_attention(q, cache, slots)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dt,
                          param_dtype=jnp.float32,
                          kernel_init=_param_init(("heads", "head_dim", "embed")),
                          name="o")(_rows(out))
    return out.reshape(b, t, cfg.d_model), cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype

    def dense(name, features, axes):
      return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                      kernel_init=_param_init(axes), name=name)

    rows = _rows(x)
    h = nn.silu(dense("gate", cfg.ffn_dim, ("embed", "mlp"))(rows))
    h = h * dense("up", cfg.ffn_dim, ("embed", "mlp"))(rows)
    return dense("down", cfg.d_model, ("mlp", "embed"))(h).reshape(x.shape)


class Block(nn.Module):
  cfg: ModelConfig
  mesh: Any = None

  @nn.compact
  def __call__(self, carry, positions, subtree_end, cache_index, tiles=None):
    x, cache = carry  # cache: this layer's {"k", "v"} or None
    cfg = self.cfg
    h, cache = Attention(cfg, self.mesh, name="attn")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x),
        positions, subtree_end, cache, cache_index, tiles)
    x = x + h
    x = x + Mlp(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
    return (_constrain_tokens(x, self.mesh), cache), None


class Decoder(nn.Module):
  """tokens int[B, T] -> logits float32[B, T, V] (training and uncached forward).

  With `head=False`: the final (normed) hidden states [B, T, d] in the compute dtype instead,
  for losses that apply the output projection themselves (`head_weights`). `tiles`
  int32[B, N, 2]: the tile list of `tile_attention.attention_tiles(subtree_end,
  cfg.attention_block)`; given, attention runs over those tiles only. `mesh`: a
  `jax.sharding.Mesh` whose `sequence` axis has n > 1 devices makes attention sequence-
  parallel over it (`ring_attention`; everything else is per token); None: plain attention.
  """

  cfg: ModelConfig
  head: bool = True
  mesh: Any = None

  @nn.compact
  def __call__(self, tokens, positions, subtree_end, tiles=None):
    cfg = self.cfg
    embed = _embed(cfg)
    x = _constrain_tokens(embed(tokens), self.mesh)
    block = Block
    if cfg.remat:
      block = nn.remat(Block, prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,) * 4,
                     length=cfg.n_layers, unroll=min(cfg.scan_unroll, cfg.n_layers),
                     metadata_params={nn.PARTITION_NAME: "layers"})
    (x, _), _ = layers(cfg, self.mesh, name="layers")((x, None), positions, subtree_end, None,
                                                      tiles)
    x = _final_norm(cfg)(x)
    if not self.head:
      return x
    x = _rows(x)
    logits = embed.attend(x) if cfg.tie_embeddings else _lm_head(cfg)(x)
    return logits.astype(jnp.float32).reshape(tokens.shape + (-1,))


def decode(cfg: ModelConfig, params, layer_params, tokens, positions, cache, cache_index,
           logits_index=None):
  """The Decoder's computation with a KV cache, layer by layer (prefill and decode).

  layer_params: a sequence of n_layers per-layer param trees (the "layers" subtree sliced
  on its leading axis); cache: a sequence of per-layer {"k", "v": [B, KV, S, D]}. Unrolled
  over separate arrays because XLA CPU materialises every per-layer slice of stacked params
  or caches inside a layer scan (a copy of all weights per decode step). Returns (logits
  float32[B, T, V], or [B, 1, V] at position logits_index int[B] of each row; new cache).
  """
  x = _embed(cfg).apply({"params": params["embed"]}, tokens)
  new_cache = []
  for lp, lc in zip(layer_params, cache, strict=True):
    (x, lc), _ = Block(cfg).apply({"params": lp}, (x, lc), positions, None, cache_index)
    new_cache.append(lc)
  if logits_index is not None:  # prefill needs one row of logits, not T x vocab
    x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)
  x = _final_norm(cfg).apply({"params": params["final_norm"]}, x)
  if cfg.tie_embeddings:
    logits = _embed(cfg).apply({"params": params["embed"]}, x, method="attend")
  else:
    logits = _lm_head(cfg).apply({"params": params["lm_head"]}, x)
  return logits.astype(jnp.float32), tuple(new_cache)


def head_weights(cfg: ModelConfig, params):
  """The output projection float[d, V] in the compute dtype, as the Decoder applies it."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T.astype(cfg.compute_dtype)
  return params["lm_head"]["kernel"].astype(cfg.compute_dtype)


def _constrain_tokens(x, mesh):
  """With a sequence-parallel mesh, pin activations [B, T, d] to rows over data x fsdp and
  tokens over `sequence` (the logical ("batch", "length", "act_embed")): left alone, the
  compiler keeps the layer scan's carry and saved residuals whole on every device."""
  if sequence_size(mesh) == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_sharding(("batch", "length", "act_embed"), x.shape, mesh))


def _rows(x):
  """[B, T, ...] -> [B*T, ...] before a projection.

  With one token axis the weight gradient contracts a single axis, which XLA's CPU dot takes
  as it is; contracting (B, T) makes it copy the output gradient transposed first (for the
  MLP a strided, cache-missing copy that cost as much as the matmuls themselves).
  """
  return x.reshape((-1,) + x.shape[2:])


def _embed(cfg):
  return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                  param_dtype=jnp.float32, embedding_init=_param_init(("vocab", "embed")),
                  name="embed")


def _final_norm(cfg):
  return RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")


def _lm_head(cfg):
  return nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                  param_dtype=jnp.float32, kernel_init=_param_init(("embed", "vocab")),
                  name="lm_head")
