"""Context parallelism: the tree step with rows split over the `sequence` mesh axis equals
the single-device tree step (loss and gradient, float32, rtol 1e-5).

The gradient is read out of the step itself: the optimizer here records the gradient it is
given as its state (and leaves the params alone), so one compiled step per mesh yields the
loss (metrics) and the full gradient (opt_state) as `make_tree_step` computes them. The
batch is a packed forest of random groups (several branches, shared prefixes, padding) with
old and reference logprobs spread around the model's, so clipping, dual clip, TIS and KL act.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from katjax import model as kmodel
from katjax.core.losses import PolicyLossConfig
from katjax.core.tree_pack import pack_trees
from katjax.parallel import batch_sharding, make_mesh, replicated, shard_params
from katjax.testing.trees import random_group
from katjax.train import TrainState
from katjax.train.tree_step import make_tree_step

# attention_block 8: several blocks per shard of 64 / n tokens.
CFG = kmodel.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=64, attention_impl="dense", attention_block=8)
LOSS = PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.1,
                        kl_type="k3", tis_cap=2.0)
ROWS, S = 4, 64


def _record_grad():
  """An optimizer whose state is the last gradient and whose update is zero."""
  return optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


OPT = _record_grad()


@pytest.fixture(scope="module")
def case():
  """(params, batch, loss, gradient): the batch and the single-device step's numbers."""
  params = kmodel.init(CFG, jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  groups = [random_group(rng, vocab_size=CFG.vocab_size, branches=int(rng.integers(4, 7)),
                         prompt_len=(4, 12), piece_len=(3, 10), group_id=g) for g in range(4)]
  batch = pack_trees(groups, S, num_rows=ROWS).arrays()
  assert (batch["subtree_end"] < S).any()  # several trees and branches, not causal rows
  # Old and reference logprobs near the tiny model's (about -log 32): ratios around 1 with
  # enough spread to clip some tokens and to give the KL a gradient.
  for name in ("old_logp", "ref_logp"):
    batch[name] = (-np.log(CFG.vocab_size) + rng.normal(0.0, 0.3, (ROWS, S))).astype(np.float32)
  # A copy: the step donates its state (params stays for the sharded runs).
  state = TrainState.create(jax.tree.map(jnp.copy, params), OPT, jax.random.PRNGKey(1))
  new_state, metrics = make_tree_step(CFG, LOSS, OPT)(state, batch)
  assert float(metrics["clipped_tokens"]) > 0 and int(metrics["skipped"]) == 0
  return params, batch, float(metrics["loss"]), jax.device_get(new_state.opt_state)


def _sharded_step(mesh, params):
  """(state, step) on `mesh`: params by their logical axes, rows split over `sequence`."""
  sharded = shard_params(params, kmodel.logical_axes(CFG), mesh)
  state = jax.jit(functools.partial(TrainState.create, optimizer=OPT))(
      sharded, rng=jax.device_put(jax.random.PRNGKey(1), replicated(mesh)))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = make_tree_step(CFG, LOSS, OPT, state_shardings=state_sh,
                        batch_sharding=batch_sharding(mesh, 2, length=True),
                        out_sharding=replicated(mesh))
  return state, step


@pytest.mark.parametrize("shape", [dict(data=2, sequence=2, tensor=2),
                                   dict(data=2, sequence=4)])
def test_sequence_parallel_tree_step_equals_single_device(case, shape):
  params, batch, ref_loss, ref_grad = case
  mesh = make_mesh(**{"data": 1, **shape})
  state, step = _sharded_step(mesh, params)
  arrays = jax.device_put(batch, batch_sharding(mesh, 2, length=True))
  # the tokens of each row really are split over the sequence devices
  assert arrays["tokens"].addressable_shards[0].data.shape[1] == S // shape["sequence"]
  compiled = step.lower(state, arrays).compile()
  assert "collective-permute" in compiled.as_text()  # the ring, not a gathered row
  new_state, metrics = compiled(state, arrays)
  assert int(metrics["skipped"]) == 0
  np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
  got = jax.device_get(new_state.opt_state)
  num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(got),
                                                       jax.tree.leaves(ref_grad)))
  den = sum(float(np.sum(b ** 2)) for b in jax.tree.leaves(ref_grad))
  assert (num / den) ** 0.5 <= 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got,
               ref_grad)


def test_row_not_divisible_by_the_sequence_axis_is_refused(case):
  params, batch, _, _ = case
  state, step = _sharded_step(make_mesh(data=2, sequence=4), params)
  short = {k: v[:, :S - 2] for k, v in batch.items()}
  with pytest.raises(ValueError, match=f"row length {S - 2} is not divisible by the mesh's "
                                       "sequence axis of 4 devices"):
    step(state, short)
  tiles = np.zeros((ROWS, 3, 2), np.int32)
  with pytest.raises(ValueError, match="leave attention_tiles out"):
    step(state, dict(batch, attention_tiles=tiles))


def test_mid_and_sft_refuse_the_sequence_axis():
  from katjax.train.loop import _check_batch_fits_mesh
  with pytest.raises(ValueError, match=r"config.mesh.sequence=2 splits RL tree rows .* set "
                                       r"--config.mesh.sequence=1"):
    _check_batch_fits_mesh(8, 1, make_mesh(data=4, sequence=2))
  _check_batch_fits_mesh(8, 1, make_mesh(data=4, fsdp=2))
