"""Tree train step on the real decoder: loss and param gradient == flat per-branch sum.

The flat side runs the tiny decoder causally on each trajectory alone (padded rows, default
positions and causal mask), takes the usual shifted log-softmax, and applies the PPO/DAPO,
dual-clip, TIS and k3-KL formulas per branch and per token with per-branch weights computed
here from the trajectories. Old and reference logprobs come from their own params, in
tree form on the tree side and in flat form on the flat side.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from katjax import model as kmodel
from katjax.testing.trees import random_group
from katjax.core.losses import PolicyLossConfig
from katjax.core.tree_pack import pack_trees
from katjax.parallel import batch_sharding, make_mesh, replicated, shard_params
from katjax.train import TrainState, make_optimizer
from katjax.train.tree_step import make_tree_loss_fn, make_tree_step, tree_logprobs

CFG = kmodel.ModelConfig(attention_impl="dense")
LOSS = PolicyLossConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_coef=0.1,
                        kl_type="k3", tis_cap=2.0)
ROWS, S, NB = 4, 64, 18


@pytest.fixture(scope="module")
def params3():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = kmodel.init(CFG, keys[0])

  @jax.jit
  def perturb(key, scale):
    leaves, tree = jax.tree.flatten(params)
    ks = jax.random.split(key, len(leaves))
    return tree.unflatten([x + scale * jnp.std(x) * jax.random.normal(k, x.shape)
                           for x, k in zip(leaves, ks)])

  return params, perturb(keys[1], 0.5), perturb(keys[2], 0.5)


@jax.jit
def _tree(params, old_params, ref_params, batch):
  batch = dict(batch, old_logp=tree_logprobs(CFG, old_params, batch)[0],
               ref_logp=tree_logprobs(CFG, ref_params, batch)[0])
  loss_fn = make_tree_loss_fn(CFG, LOSS)

  def f(p):
    loss_sum, denom, aux = loss_fn(p, batch, None)
    return loss_sum / denom, aux

  return jax.value_and_grad(f, has_aux=True)(params)


def _flat_logp(params, tokens):
  logits = kmodel.forward(CFG, params, tokens)  # causal, positions 0..L-1
  lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lsm, tokens[:, 1:, None], axis=-1)[..., 0]  # predicts t >= 1


@jax.jit
def _flat(params, old_params, ref_params, flat):
  old = _flat_logp(old_params, flat["tokens"])
  ref = _flat_logp(ref_params, flat["tokens"])
  mask, a, rollout = flat["mask"][:, 1:], flat["adv"][:, None], flat["rollout"][:, 1:]

  def f(p):
    logp = _flat_logp(p, flat["tokens"])
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1 - LOSS.eps_low, 1 + LOSS.eps_high)
    obj = jnp.minimum(ratio * a, clipped * a)
    obj = jnp.where(a < 0, jnp.maximum(obj, LOSS.dual_clip * a), obj)
    obj = obj * jnp.minimum(jnp.exp(old - rollout), LOSS.tis_cap)
    log_r = ref - logp
    loss = -obj + LOSS.kl_coef * (jnp.exp(log_r) - log_r - 1)
    per_branch = jnp.sum(mask * loss, axis=1)
    return jnp.sum(flat["w"] * per_branch) / flat["denom"]

  return jax.value_and_grad(f)(params)


def _flat_arrays(trajs, norm):
  out = {"tokens": np.zeros((NB, S), np.int32), "mask": np.zeros((NB, S), np.float32),
         "rollout": np.zeros((NB, S), np.float32), "adv": np.zeros(NB, np.float32),
         "w": np.zeros(NB, np.float32)}
  for b, t in enumerate(trajs):
    n = len(t)
    out["tokens"][b, :n] = t.tokens
    out["mask"][b, :n] = t.loss_mask
    out["rollout"][b, :n] = t.logprobs
    out["adv"][b] = t.advantage
  n_tok = out["mask"].sum(axis=1)
  if norm == "seq-mean-token-mean":
    out["w"] = np.where(n_tok > 0, 1.0 / np.maximum(n_tok, 1), 0.0).astype(np.float32)
  else:
    out["w"][:len(trajs)] = 1.0
  out["denom"] = np.float32(n_tok.sum() if norm == "token-mean" else np.sum(n_tok > 0))
  return out


def _rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                         jax.tree.leaves(b)))
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return (num / max(den, 1e-30)) ** 0.5


@settings(max_examples=6, deadline=None)
@given(st.integers(0, 2**31 - 1),
       st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
def test_tree_step_loss_and_grad_equal_flat(params3, seed, norm):
  rng = np.random.default_rng(seed)
  groups = [random_group(rng, vocab_size=16, branches=int(rng.integers(2, 7)), group_id=g)
            for g in range(3)]
  trajs = [t for g in groups for t in g]
  batch = pack_trees(groups, S, norm=norm, num_rows=ROWS).arrays()
  (loss, aux), grad = _tree(*params3, batch)
  ref_loss, ref_grad = _flat(*params3, _flat_arrays(trajs, norm))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-7)
  assert _rel(grad, ref_grad) <= 1e-5
  assert float(aux["flat_tokens"]) == sum(len(t) for t in trajs)


def test_old_params_exercise_the_clip(params3):
  groups = [random_group(np.random.default_rng(3), vocab_size=16, branches=6)]
  batch = pack_trees(groups, S, num_rows=ROWS).arrays()
  (_, aux), _ = _tree(*params3, batch)
  assert 0 < float(aux["clipped_tokens"]) < float(aux["trained_tokens"])


def test_sharded_on_policy_step_matches_flat_gradient(params3):
  params = params3[0]
  rng = np.random.default_rng(11)
  groups = [random_group(rng, vocab_size=16, branches=5, group_id=g) for g in range(3)]
  trajs = [t for g in groups for t in g]
  batch = pack_trees(groups, S, num_rows=8).arrays()
  # Reference = current params: the k3 KL and its gradient vanish, on both sides.
  batch["ref_logp"] = jax.jit(tree_logprobs, static_argnums=0)(CFG, params, batch)[0]
  mesh = make_mesh(data=4, fsdp=2)
  opt = make_optimizer({"learning_rate": 1e-3, "warmup_steps": 0, "clip_norm": 0.0})
  sharded = shard_params(params, kmodel.logical_axes(CFG), mesh)
  state = jax.jit(functools.partial(TrainState.create, optimizer=opt))(
      sharded, rng=jax.device_put(jax.random.PRNGKey(1), replicated(mesh)))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = make_tree_step(CFG, LOSS, opt, state_shardings=state_sh,
                        batch_sharding=batch_sharding(mesh, 2), out_sharding=replicated(mesh),
                        micro_batches=2)
  new_state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh, 2)))
  # On-policy (no old_logp): ratio 1, so the flat gradient with old params = params.
  flat = _flat_arrays(trajs, "token-mean")
  ref_loss, ref_grad = _flat(params, params, params, flat)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  ref_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(ref_grad))))
  np.testing.assert_allclose(metrics["grad_norm"], ref_norm, rtol=1e-4)
  assert int(metrics["skipped"]) == 0 and int(new_state.step) == 1
