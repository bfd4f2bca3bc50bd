"""eta = 0 is the synchronous algorithm: the flow learner's decoupled step equals the
on-policy tree step on the same groups (proximal = behaviour = current policy)."""

import dataclasses

import jax
import numpy as np
import optax

from katjax.core.losses import PolicyLossConfig
from katjax.core.prune import PruneConfig, prune_batch
from katjax.flow.learner import TreeLearner, with_advantages
from katjax.model import TINY, init
from katjax.testing.trees import random_group
from katjax.train.state import TrainState
from katjax.train.tree_step import make_tree_step

CFG = TINY.replace(vocab_size=64)


def test_eta_zero_step_equals_the_synchronous_on_policy_step():
  rng = np.random.default_rng(0)
  groups = [random_group(rng, vocab_size=64, group_id=g) for g in range(2)]
  params = init(CFG, jax.random.PRNGKey(0))
  # Behaviour logprobs = the current policy's (what an eta = 0 rollout records), so the
  # truncated importance weight is exactly 1 wherever it is computed.
  loss_cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, tis_cap=2.0)
  opt = optax.sgd(0.05)
  learner = TreeLearner(CFG, TrainState.create(jax.tree.map(np.array, params), opt,
                                               jax.random.PRNGKey(1)), opt, loss_cfg,
                        num_rows=2, row_tokens=128, prune_cfg=PruneConfig())
  arrays, _ = learner.batch(groups)
  logp = np.asarray(arrays["old_logp"])  # the proximal = current policy's logprobs
  arrays["logprobs"] = logp  # behaviour = current
  sync_cfg = dataclasses.replace(loss_cfg, tis_cap=None)
  sync_step = make_tree_step(CFG, sync_cfg, opt)
  sync_batch, _ = prune_batch([with_advantages(g) for g in groups], 2, 128, PruneConfig(),
                              norm=sync_cfg.norm)
  sync_arrays = jax.tree.map(np.asarray, sync_batch.arrays())  # no old_logp: on-policy
  flow_step = make_tree_step(CFG, loss_cfg, opt)
  s_sync, m_sync = sync_step(TrainState.create(jax.tree.map(np.array, params), opt,
                                               jax.random.PRNGKey(1)), sync_arrays)
  s_flow, m_flow = flow_step(learner.state, arrays)
  np.testing.assert_allclose(float(m_flow["loss"]), float(m_sync["loss"]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s_flow.params), jax.tree.leaves(s_sync.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
