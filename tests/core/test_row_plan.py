"""plan_rows: parts never exceed the row budget, and any layout trains the same."""

import jax
import numpy as np
import pytest

from katjax import model as kmodel
from katjax.core.losses import PolicyLossConfig
from katjax.core.row_plan import layout_cost, plan_rows
from katjax.core.tree import build_tree
from katjax.core.tree_pack import pack_trees
from katjax.testing.trees import realistic_groups
from katjax.train.tree_step import make_tree_loss_fn

SHAPE = dict(prompt_len=(20, 40), turns=(1, 3), assistant_len=(5, 20), tool_len=(5, 20))


def _key(t):
  return tuple(int(x) for x in t.tokens), float(t.advantage)


@pytest.mark.parametrize("seed", range(4))
def test_parts_fit_the_budget_and_keep_every_trajectory(seed):
  groups = realistic_groups(2, seed=seed, **SHAPE)
  longest = max(len(t) for g in groups for t in g)
  sizes = [build_tree(g).num_tokens for g in groups]
  for budget in (longest, (longest + max(sizes)) // 2, max(sizes)):
    parts = plan_rows(groups, budget)
    assert all(build_tree(p).num_tokens <= budget for p in parts)
    assert sorted(_key(t) for p in parts for t in p) == sorted(
        _key(t) for g in groups for t in g)
    pack_trees(parts, budget)  # fits rows of the budget
    # A whole tree that fits is kept whole; splitting only ever adds tokens.
    whole = sum(n for n in sizes)
    assert layout_cost(parts)["tokens"] >= whole
    if budget >= max(sizes):
      assert len(parts) == len(groups)
  with pytest.raises(ValueError, match="cannot be split"):
    plan_rows(groups, longest - 1)


def test_planned_layout_gives_the_same_loss_and_gradient_as_other_layouts():
  """Split trees (budget = the longest trajectory), whole trees, and flat sequences: one
  loss and one parameter gradient (per-branch normalisers; old logprobs = the rollout's, so
  ratios are far from 1 and the clip is active)."""
  groups = realistic_groups(2, seed=5, **SHAPE)
  longest = max(len(t) for g in groups for t in g)
  size = max(build_tree(g).num_tokens for g in groups)
  parts = plan_rows(groups, longest)
  assert len(parts) > len(groups)  # the budget forces splits
  cfg = kmodel.ModelConfig(attention_impl="dense", n_layers=1)
  params = kmodel.init(cfg, jax.random.PRNGKey(0))
  for norm in ("seq-mean-token-mean",):
    loss_fn = make_tree_loss_fn(cfg, PolicyLossConfig(eps_high=0.28, norm=norm))

    @jax.jit
    def value_grad(params, batch):
      def f(p):
        s, d, _ = loss_fn(p, batch, None)
        return s / d
      return jax.value_and_grad(f)(params)

    layouts = {"planned": pack_trees(parts, longest, norm=norm),
               "whole": pack_trees(groups, size, norm=norm),
               "flat": pack_trees([[t] for g in groups for t in g], longest, norm=norm)}
    results = {k: value_grad(params, dict(b.arrays(), old_logp=b.logprobs))
               for k, b in layouts.items()}
    ref_loss, ref_grad = results["whole"]
    for name in ("planned", "flat"):
      loss, grad = results[name]
      assert abs(float(ref_loss)) > 1e-2  # a loss that can tell layouts apart
      np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=name)
      for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        scale = float(np.max(np.abs(np.asarray(r))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                                   atol=1e-5 * scale, err_msg=name)
