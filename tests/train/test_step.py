"""train_step: exact micro-batch accumulation, non-finite skip, optimizer schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from katjax.train import TrainState, make_optimizer, make_schedule, train_step


def _weighted_sq_loss(params, batch, rng):
  # loss_sum over weighted rows; denom = total weight (varies per micro-batch on purpose)
  del rng
  pred = batch["x"] @ params["w"] + params["b"]
  err = (pred - batch["y"]) ** 2
  return jnp.sum(err * batch["m"]), jnp.sum(batch["m"]), {"rows": jnp.float32(len(err))}


def _data(seed=0, n=16, d=5):
  rs = np.random.RandomState(seed)
  m = (rs.rand(n) < 0.6).astype(np.float32)
  m[:3] = 1.0
  return ({"w": jnp.asarray(rs.randn(d), jnp.float32), "b": jnp.zeros((), jnp.float32)},
          {"x": rs.randn(n, d).astype(np.float32), "y": rs.randn(n).astype(np.float32), "m": m})


def test_micro_batches_equal_one_big_batch():
  params, batch = _data()
  sgd = optax.sgd(0.1)
  outs = {}
  for mb in (1, 4):
    step = jax.jit(functools.partial(train_step, loss_fn=_weighted_sq_loss, optimizer=sgd,
                                     micro_batches=mb))
    outs[mb] = step(TrainState.create(params, sgd, jax.random.PRNGKey(0)), batch)
  # independent NumPy gradient of sum(m * err^2) / sum(m)
  x, y, m = batch["x"], batch["y"], batch["m"]
  w = np.asarray(params["w"])
  r = x @ w - y
  gw = 2 * (m * r) @ x / m.sum()
  gb = 2 * np.sum(m * r) / m.sum()
  for mb, (state, metrics) in outs.items():
    np.testing.assert_allclose(state.params["w"], w - 0.1 * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["b"], -0.1 * gb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.sum(m * r ** 2) / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(metrics["denom"], m.sum())
    assert int(metrics["rows"]) == 16  # aux summed over micro-batches
    assert int(state.step) == 1


def test_accumulation_with_adamw_and_model_matches():
  params, batch = _data(seed=3)
  opt = make_optimizer({"learning_rate": 1e-2, "warmup_steps": 1, "total_steps": 10})
  states = {}
  for mb in (1, 4):
    step = jax.jit(functools.partial(train_step, loss_fn=_weighted_sq_loss, optimizer=opt,
                                     micro_batches=mb))
    s = TrainState.create(params, opt, jax.random.PRNGKey(0))
    for _ in range(3):
      s, _ = step(s, batch)
    states[mb] = s
  for a, b in zip(jax.tree.leaves(states[1].params), jax.tree.leaves(states[4].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_is_skipped_and_counted():
  params, batch = _data(seed=1)
  opt = make_optimizer({"learning_rate": 1e-2, "warmup_steps": 1, "total_steps": 10})
  step = jax.jit(functools.partial(train_step, loss_fn=_weighted_sq_loss, optimizer=opt,
                                   micro_batches=2))
  s0 = TrainState.create(params, opt, jax.random.PRNGKey(0))
  s1, m1 = step(s0, batch)
  assert int(m1["skipped"]) == 0
  bad = dict(batch, x=batch["x"].copy())
  bad["x"][5, 2] = np.inf
  s2, m2 = step(s1, bad)
  assert int(m2["skipped"]) == 1
  assert int(s2.step) == 2
  for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state)),
                  jax.tree.leaves((s2.params, s2.opt_state))):
    np.testing.assert_array_equal(a, b)
  s3, m3 = step(s2, batch)  # training continues normally afterwards
  assert int(m3["skipped"]) == 0 and np.all(np.isfinite(s3.params["w"]))
  assert sum(int(m["skipped"]) for m in (m1, m2, m3)) == 1


def test_schedule_and_lr_metric():
  cfg = {"learning_rate": 1.0, "warmup_steps": 4, "total_steps": 20, "end_lr_ratio": 0.1}
  sched = make_schedule(cfg)
  np.testing.assert_allclose(sched(2), 0.5)
  np.testing.assert_allclose(sched(20), 0.1, rtol=1e-5)
  mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 8 / 16))
  np.testing.assert_allclose(sched(12), mid, rtol=1e-5)
  params, batch = _data()
  opt = make_optimizer(cfg)
  step = jax.jit(functools.partial(train_step, loss_fn=_weighted_sq_loss, optimizer=opt))
  s = TrainState.create(params, opt, jax.random.PRNGKey(0))
  lrs = []
  for _ in range(3):
    s, m = step(s, batch)
    lrs.append(float(m["lr"]))
  np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5], atol=1e-7)


def test_bad_inputs():
  params, batch = _data()
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="not divisible by micro_batches=3"):
    train_step(TrainState.create(params, opt, jax.random.PRNGKey(0)), batch,
               loss_fn=_weighted_sq_loss, optimizer=opt, micro_batches=3)
  with pytest.raises(ValueError, match="unknown field"):
    make_optimizer({"learning_rat": 1.0})
