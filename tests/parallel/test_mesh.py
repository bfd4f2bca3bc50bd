"""Sharded forward and gradient step give the single-device numbers on several meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from katjax import model, parallel

CFG = model.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=128)
# Plain SGD: the step's numbers are then linear in the gradient. (Adam's first step divides
# g by |g|, which turns reduction-order noise in near-zero gradients into O(lr) changes.)
OPT = optax.sgd(0.1, momentum=0.9)


def _step(params, opt_state, tokens):
  def loss(p):
    logits = model.forward(CFG, p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  l, g = jax.value_and_grad(loss)(params)
  updates, opt_state = OPT.update(g, opt_state, params)
  return optax.apply_updates(params, updates), l, model.forward(CFG, params, tokens), g


@pytest.fixture(scope="module")
def reference():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
  params = model.init(CFG, jax.random.PRNGKey(0))
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 17)).astype(np.int32)
  on_one = jax.device_put((params, OPT.init(params), tokens), jax.devices()[0])
  new_params, loss, logits, grads = jax.jit(_step)(*on_one)
  return params, tokens, jax.device_get((new_params, loss, logits, grads))


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_step_matches_single_device(reference, shape):
  params, tokens, (ref_params, ref_loss, ref_logits, ref_grads) = reference
  mesh = parallel.make_mesh(*shape)
  axes = model.logical_axes(CFG)
  p_shard = parallel.param_shardings(axes, params, mesh)
  params_s = parallel.shard_params(params, axes, mesh)
  opt_state = jax.jit(OPT.init)(params_s)
  tokens_s = parallel.shard_batch(tokens, mesh)
  step = jax.jit(_step, out_shardings=(p_shard, None, None, p_shard))
  new_params, loss, logits, grads = step(params_s, opt_state, tokens_s)
  # the params really are split over the mesh where the rules say so
  q = new_params["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == parallel.logical_spec(axes["layers"]["attn"]["q"]["kernel"],
                                                  q.shape, mesh)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
  for got, want in ((grads, ref_grads), (new_params, ref_params)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                                         atol=1e-7), got, want)


def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = parallel.make_mesh(1, 2, 4)
  # kv_heads = 2 cannot split over tensor = 4: replicated on that dim instead of an error
  spec = parallel.logical_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh)
  assert spec == PartitionSpec(None, "fsdp", None, None)
  spec = parallel.logical_spec(("embed", "mlp"), (64, 128), mesh)
  assert spec == PartitionSpec("fsdp", "tensor")
  assert parallel.batch_sharding(parallel.make_mesh(2, 2, 2)).spec == PartitionSpec(
      ("data", "fsdp"), None)
  # the length axis follows "length" -> sequence only when asked (the RL tree step's rows)
  seq = parallel.make_mesh(2, 1, 1, sequence=4)
  assert parallel.batch_sharding(seq).spec == PartitionSpec("data", None)
  assert parallel.batch_sharding(seq, 2, length=True).spec == PartitionSpec("data", "sequence")
  assert parallel.logical_spec(("batch", "length", "act_embed"), (2, 64, 8), seq) == (
      PartitionSpec("data", "sequence", None))


def test_make_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs 16 devices"):
    parallel.make_mesh(4, 4, 1)
  with pytest.raises(ValueError, match="of 3 devices does not divide the 8 devices"):
    parallel.make_mesh(3, 1, 1)
  with pytest.raises(ValueError, match="uses only part of the 8 devices"):
    parallel.make_mesh(2, 2, 1)
  assert parallel.make_mesh(3, 1, 1, devices=jax.devices()[:3]).shape["data"] == 3
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="no rule"):
    parallel.logical_spec(("nonsense",), (4,), parallel.make_mesh(8, 1, 1))
  assert isinstance(parallel.replicated(parallel.make_mesh()), NamedSharding)
  assert parallel.make_mesh().shape == {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}
  assert parallel.make_mesh(2, sequence=4).shape == {"data": 2, "fsdp": 1, "sequence": 4,
                                                     "tensor": 1}
  with pytest.raises(ValueError, match="'sequence': 3"):
    parallel.make_mesh(2, sequence=3)
  assert jnp.zeros(1).shape == (1,)


def test_train_state_shardings_shard_adam_moments_like_the_params():
  from katjax.train.state import TrainState, make_optimizer
  mesh = parallel.make_mesh(1, 8, 1)
  params = parallel.shard_params(model.init(CFG, jax.random.PRNGKey(0)),
                                 model.logical_axes(CFG), mesh)
  opt = make_optimizer()
  create = lambda p: TrainState.create(p, opt, jax.random.PRNGKey(1))  # noqa: E731
  p_sh = jax.tree.map(lambda x: x.sharding, params)
  sh = parallel.train_state_shardings(opt, jax.eval_shape(create, params), p_sh, mesh)
  state = jax.jit(create, out_shardings=sh)(params)
  up = params["layers"]["mlp"]["up"]["kernel"]
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == up.shape]
  assert len(moments) == 4  # mu and nu of the up and gate kernels (same shape)
  assert up.sharding.spec == PartitionSpec(None, "fsdp", None)
  for m in moments:  # each device holds an eighth, as for the weight itself
    assert m.sharding.spec == up.sharding.spec
    assert m.addressable_shards[0].data.size == up.size // 8
  assert state.step.sharding.spec == PartitionSpec()
