"""The functional surface users import: `init`, `apply`, `forward`, `logical_axes`, caches.

`apply` validates its inputs on the host (clear ValueErrors naming the field, before any
compilation) and runs a jitted forward. `forward` is the same computation without checks,
for use inside the caller's own `jax.jit` (train steps, the sampler).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from katjax.model.config import ModelConfig
from katjax.model import decoder
from katjax.model.decoder import Decoder


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, key) -> dict:
  """Random float32 params (a plain nested dict; layer params stacked on axis 0)."""
  return nn.unbox(_init_boxed(cfg, key))


def _init_boxed(cfg, key):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg).init(key, tokens, jnp.zeros((1, 1), jnp.int32),
                           jnp.ones((1, 1), jnp.int32))["params"]


def logical_axes(cfg: ModelConfig) -> dict:
  """Pytree like params whose leaves are tuples of logical axis names (None = unnamed)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(lambda s: tuple(s), specs,
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def param_shapes(cfg: ModelConfig) -> dict:
  """Pytree of jax.ShapeDtypeStruct for the params, without allocating them."""
  return jax.eval_shape(init, cfg, jax.random.PRNGKey(0))


def forward(cfg: ModelConfig, params, tokens, positions=None, subtree_end=None, tiles=None):
  """Unchecked forward for use under jit. tokens int[B,T] -> logits float32[B,T,V].

  tiles: optional attention tile list (`katjax.model.tile_attention.attention_tiles`).
  """
  return Decoder(cfg).apply({"params": params}, tokens,
                            *_default_rows(tokens, positions, subtree_end), tiles)


def hidden_states(cfg: ModelConfig, params, tokens, positions=None, subtree_end=None,
                  tiles=None, mesh=None):
  """`forward` without the output projection: (final hidden states float[B, T, d] in the
  compute dtype, output projection float[d, V]); logits = hidden @ projection.

  mesh: a Mesh with a `sequence` axis of n > 1 devices runs attention sequence-parallel over
  it (T % n == 0; see `katjax.model.ring_attention`); call under `jax.jit`.
  """
  hidden = Decoder(cfg, head=False, mesh=mesh).apply({"params": params}, tokens,
                                          *_default_rows(tokens, positions, subtree_end), tiles)
  return hidden, decoder.head_weights(cfg, params)


def _default_rows(tokens, positions, subtree_end):
  """(positions, subtree_end), defaulting to plain causal rows: 0..T-1 and T."""
  b, t = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if subtree_end is None:
    subtree_end = jnp.full((b, t), t, jnp.int32)
  return positions, subtree_end


def apply(cfg: ModelConfig, params, tokens, positions=None, subtree_end=None):
  """Checked forward. tokens int[B,T]; positions int[B,T]; subtree_end int[B,T] -> logits.

  `subtree_end[b, k]` is one past the last query that may see key k (default T: causal).
  """
  tokens = _as_int("tokens", tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be int[B, T], got shape {tokens.shape}")
  b, t = tokens.shape
  validate_tokens(cfg, tokens)
  if positions is not None:
    positions = _as_int("positions", positions)
    _check_shape("positions", positions, (b, t))
  if subtree_end is not None:
    subtree_end = _as_int("subtree_end", subtree_end)
    validate_subtree_end(subtree_end, (b, t))
  return _forward_jit(cfg, params, tokens, positions, subtree_end)


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(cfg, params, tokens, positions, subtree_end):
  return forward(cfg, params, tokens, positions, subtree_end)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> tuple:
  """Zeroed KV cache for `forward_with_cache`: per layer {"k", "v": [B, KV, S, D]}.

  Head-major per layer so decode attention reads each layer's keys and values in place.
  """
  shape = (batch, cfg.n_kv_heads, max_len, cfg.dim_per_head)
  dtype = dtype or cfg.compute_dtype
  return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
               for _ in range(cfg.n_layers))


def split_layers(params) -> dict:
  """params with the stacked "layers" subtree replaced by a tuple of per-layer subtrees.

  `forward_with_cache` accepts either form; hand it split params when it runs many times
  with the same weights (the sampler does): XLA CPU otherwise copies each layer's weights
  out of the stack on every call.
  """
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers)
                                    for i in range(n))}


def forward_with_cache(cfg: ModelConfig, params, tokens, positions, cache, cache_index,
                       logits_index=None):
  """Prefill or decode a chunk. tokens int[B,T] written at slots cache_index int[B] + t.

  Every cache slot up to a query's own slot is visible (a plain causal row per batch item;
  tree rollouts fork by copying rows). params: stacked or `split_layers`. Returns (logits
  float32[B,T,V], new cache); with logits_index int[B], logits float32[B,1,V] at that
  position of each row only (a prefill needs no more).
  """
  params = split_layers(params)
  rest = {k: v for k, v in params.items() if k != "layers"}
  idx = None if logits_index is None else logits_index.astype(jnp.int32)
  return decoder.decode(cfg, rest, params["layers"], tokens, positions, cache,
                        cache_index.astype(jnp.int32), idx)


# --- host-side validation ----------------------------------------------------------------


def validate_tokens(cfg: ModelConfig, tokens) -> None:
  """Raise ValueError if any token id is outside [0, vocab_size) (concrete arrays only)."""
  if isinstance(tokens, jax.core.Tracer):
    return
  arr = np.asarray(tokens)
  if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
    raise ValueError(f"tokens: ids must lie in [0, vocab_size={cfg.vocab_size}); got min "
                     f"{arr.min()} max {arr.max()}")


def validate_subtree_end(subtree_end, shape) -> None:
  """Raise ValueError unless subtree_end int[B,T] has i < subtree_end[i] <= T everywhere."""
  _check_shape("subtree_end", subtree_end, shape)
  if isinstance(subtree_end, jax.core.Tracer):
    return
  se = np.asarray(subtree_end)
  t = shape[1]
  idx = np.arange(t)
  bad = (se <= idx) | (se > t)
  if bad.any():
    b, i = np.argwhere(bad)[0]
    raise ValueError(f"subtree_end[{b}, {i}] = {se[b, i]} is out of range: every token must "
                     f"see itself and stay in the row ({i} < subtree_end <= {t})")


def _as_int(name, x):
  if isinstance(x, jax.core.Tracer):
    arr = x
  else:
    arr = np.asarray(x) if not isinstance(x, jax.Array) else x
  if not jnp.issubdtype(arr.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
  return jnp.asarray(arr, jnp.int32)


def _check_shape(name, x, shape):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)} (like tokens), got "
                     f"{tuple(x.shape)}")
