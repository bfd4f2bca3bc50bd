"""Decoder: tree rows equal their linear branches, RoPE layouts, KV cache, overfitting, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from katjax import model
from katjax.model import rope

CFG = model.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=64)


@pytest.fixture(scope="module")
def params():
  return model.init(CFG, jax.random.PRNGKey(0))


def test_tree_row_equals_each_linear_branch(params):
  """A prefix shared by two branches, packed as one row: each token's logits equal the logits
  of the same token in its own linear sequence (positions = depth, interval mask)."""
  rng = np.random.default_rng(0)
  prefix, a, b = (rng.integers(0, CFG.vocab_size, n) for n in (5, 4, 3))
  row = np.concatenate([prefix, a, b])[None]
  positions = np.concatenate([np.arange(5), 5 + np.arange(4), 5 + np.arange(3)])[None]
  subtree_end = np.array([12] * 5 + [9] * 4 + [12] * 3)[None]
  tree_logits = np.asarray(model.apply(CFG, params, row, positions, subtree_end))
  flat_a = np.asarray(model.apply(CFG, params, np.concatenate([prefix, a])[None]))
  flat_b = np.asarray(model.apply(CFG, params, np.concatenate([prefix, b])[None]))
  np.testing.assert_allclose(tree_logits[0, :9], flat_a[0], atol=1e-5)
  np.testing.assert_allclose(tree_logits[0, 9:], flat_b[0, 5:], atol=1e-5)
  np.testing.assert_allclose(tree_logits[0, :5], flat_b[0, :5], atol=1e-5)


def test_blockwise_model_matches_dense(params):
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 24))
  dense = model.apply(CFG.replace(attention_impl="dense"), params, tokens)
  block = model.apply(CFG.replace(attention_impl="blockwise", attention_block=8), params,
                      tokens)
  np.testing.assert_allclose(np.asarray(block), np.asarray(dense), atol=1e-5)


def test_unrolled_layer_scan_matches_rolled(params):
  """scan_unroll changes how the layer loop runs, not what it computes: logits and the
  gradient of every (stacked) parameter agree with the one-layer-per-iteration scan."""
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 16))

  def loss(cfg, p):
    return jnp.sum(model.apply(cfg, p, tokens) ** 2)

  rolled = jax.jit(jax.value_and_grad(lambda p: loss(CFG, p)))(params)
  unrolled = jax.jit(jax.value_and_grad(
      lambda p: loss(CFG.replace(scan_unroll=CFG.n_layers), p)))(params)
  np.testing.assert_allclose(unrolled[0], rolled[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(unrolled[1]), jax.tree.leaves(rolled[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_times_head_weights_are_the_logits(tie):
  """The pieces the chunked loss uses (hidden states, output projection) give exactly the
  Decoder's own logits, with tied and untied embeddings."""
  cfg = CFG.replace(tie_embeddings=tie)
  p = model.init(cfg, jax.random.PRNGKey(5))
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 12))
  hidden, head = model.hidden_states(cfg, p, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(hidden @ head), np.asarray(model.apply(cfg, p, tokens)),
                             rtol=1e-5, atol=1e-5)


def test_rope_half_matches_numpy():
  cfg = CFG.replace(rope_theta=1e6)
  x = np.random.default_rng(2).standard_normal((1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None]
  out = np.asarray(rope.apply_rope(x, pos, cfg))
  inv = 1.0 / (1e6 ** (np.arange(0, 8, 2) / 8))
  ang = pos[0][:, None] * inv  # [T, 4]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x[0, ..., :4], x[0, ..., 4:]
  ref = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  np.testing.assert_allclose(out[0], ref, atol=1e-5)


def test_interleaved_layout_equals_half_with_permuted_weights(params):
  """Interleaved RoPE on weights whose head columns are interleaved == half-split RoPE."""
  hd = CFG.dim_per_head
  perm = np.stack([np.arange(hd // 2), hd // 2 + np.arange(hd // 2)], -1).reshape(-1)
  p2 = jax.tree.map(lambda x: x, params)
  for name in ("q", "k"):
    p2["layers"]["attn"][name]["kernel"] = params["layers"]["attn"][name]["kernel"][..., perm]
  tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 10))
  half = model.apply(CFG, params, tokens)
  inter = model.apply(CFG.replace(rope_layout="interleaved"), p2, tokens)
  np.testing.assert_allclose(np.asarray(inter), np.asarray(half), atol=1e-5)


def test_kv_cache_prefill_and_decode_equal_full_forward(params):
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 12))
  full = np.asarray(model.apply(CFG, params, tokens))
  cache = model.init_cache(CFG, batch=2, max_len=16)
  step = jax.jit(lambda p, t, pos, c, i: model.forward_with_cache(CFG, p, t, pos, c, i))
  pos = np.broadcast_to(np.arange(8), (2, 8))
  logits, cache = step(params, tokens[:, :8], pos, cache, jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=1e-5)
  for t in range(8, 12):
    logits, cache = step(params, tokens[:, t:t + 1], np.full((2, 1), t), cache,
                         jnp.full(2, t, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=1e-5)


@pytest.mark.parametrize("flags", [dict(qkv_bias=True), dict(qk_norm=True, head_dim=16),
                                   dict(tie_embeddings=True), dict(remat=True),
                                   dict(rope_scaling="llama3", rope_scaling_factor=8.0,
                                        rope_original_max_position=16)])
def test_family_variants_run_and_match_param_count(flags):
  cfg = CFG.replace(**flags)
  p = model.init(cfg, jax.random.PRNGKey(1))
  assert sum(x.size for x in jax.tree.leaves(p)) == cfg.num_params()
  logits = model.apply(cfg, p, np.zeros((1, 4), np.int32))
  assert logits.shape == (1, 4, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bf16_compute_keeps_fp32_params_and_is_close(params):
  tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (1, 8))
  f32 = np.asarray(model.apply(CFG, params, tokens))
  b16 = np.asarray(model.apply(CFG.replace(dtype="bfloat16"), params, tokens))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max()


def test_tiny_model_overfits_a_fixed_batch():
  cfg = CFG.replace(n_layers=1)
  p = model.init(cfg, jax.random.PRNGKey(2))
  tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 16))
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    def loss(p):
      logits = model.forward(cfg, p, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    l, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  s = opt.init(p)
  for _ in range(150):
    p, s, l = step(p, s)
  assert float(l) < 0.1


# --- bad input: ValueError naming the field, before compilation ---------------------------


def test_config_heads_not_divisible_by_kv_heads():
  with pytest.raises(ValueError, match="n_kv_heads"):
    model.ModelConfig(n_heads=6, n_kv_heads=4, head_dim=16)


def test_config_scan_unroll_must_be_positive():
  with pytest.raises(ValueError, match="scan_unroll"):
    model.ModelConfig(scan_unroll=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(subtree_end=np.full((1, 5), 4)), "subtree_end"),  # wrong shape
    (dict(subtree_end=np.array([[4, 4, 4, 4, 3, 4]])), "subtree_end"),  # token cannot see itself
    (dict(subtree_end=np.full((1, 6), 7)), "subtree_end"),  # past the row
    (dict(positions=np.zeros((2, 6), np.int32)), "positions"),
    (dict(subtree_end=np.full((1, 6), 6.0)), "subtree_end"),  # float dtype
])
def test_bad_masks_and_positions(params, kwargs, field, monkeypatch):
  monkeypatch.setattr(model.api, "_forward_jit", _must_not_compile)
  with pytest.raises(ValueError, match=field):
    model.apply(CFG, params, np.zeros((1, 6), np.int32), **kwargs)


def test_token_ids_out_of_vocab(params, monkeypatch):
  monkeypatch.setattr(model.api, "_forward_jit", _must_not_compile)
  with pytest.raises(ValueError, match="vocab_size"):
    model.apply(CFG, params, np.array([[1, 2, CFG.vocab_size]]))
  with pytest.raises(ValueError, match="tokens"):
    model.apply(CFG, params, np.array([[-1, 2]]))


def _must_not_compile(*args, **kwargs):
  raise AssertionError("validation must reject the input before compiling")
