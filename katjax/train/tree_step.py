"""The tree policy loss as a `loss_fn` for the generic train step, and a sharded tree step.

One model forward per packed row: the interval mask `subtree_end` makes every token attend
to exactly its own trajectory's prefix, and `positions` (the token's depth) gives it the
RoPE position it has in its linear sequence, so the logits of every tree token equal those
of the flat sequences. Old (and reference) logprobs are computed in the same tree form by
`tree_logprobs`, so every branch through a token sees one value.

Batch: `TreeBatch.arrays()` (all [R, S]) plus, optionally, `old_logp` (PPO with several
updates per rollout batch; absent = on-policy: old = stop_gradient(logp) of this very
forward pass), `ref_logp` (needed when loss_cfg.kl_coef > 0) and `attention_tiles`
(int32[R, N, 2] from `katjax.model.tile_attention.attention_tiles(subtree_end,
model_cfg.attention_block)`: attention over only the tiles the tree mask touches).
"""

from __future__ import annotations

import functools

import jax

from katjax.core.head_logprobs import head_logprobs
from katjax.core.losses import PolicyLossConfig, tree_policy_loss
from katjax.model import hidden_states
from katjax.train.step import train_step


def make_tree_loss_fn(model_cfg, loss_cfg: PolicyLossConfig):
  """loss_fn(params, batch, rng) -> (loss_sum, denom, aux sums) for `train_step`."""

  def loss_fn(params, batch, rng):
    del rng
    logp, entropy = tree_logprobs(model_cfg, params, batch)
    old = batch["old_logp"] if "old_logp" in batch else logp  # stop-gradient in the loss
    loss_sum, metrics = tree_policy_loss(logp, old, batch, loss_cfg, entropy=entropy)
    denom = metrics.pop("denom")
    return loss_sum, denom, metrics

  return loss_fn


def tree_logprobs(model_cfg, params, batch):
  """(logp, entropy) float32[R, S] of the tree tokens under `params` (old / reference).

  Through the output projection in chunks of tokens (`head_logprobs`): the [R, S, vocab]
  logits are never stored, forward or backward.
  """
  h, w = hidden_states(model_cfg, params, batch["tokens"], batch["positions"],
                       batch["subtree_end"], batch.get("attention_tiles"))
  return head_logprobs(h, w, batch)


def make_tree_step(model_cfg, loss_cfg: PolicyLossConfig, optimizer, *, state_shardings=None,
                   batch_sharding=None, out_sharding=None, micro_batches: int = 1):
  """jit(train_step with the tree loss): (state, batch) -> (state, metrics).

  Shardings as in the SFT loop (`katjax.train.loop`): the state's own shardings, every
  batch array [R, S] sharded over the batch mesh axes (`katjax.parallel.batch_sharding`),
  replicated metrics. Without shardings, a plain jit. The state is donated.
  """
  step = functools.partial(train_step, loss_fn=make_tree_loss_fn(model_cfg, loss_cfg),
                           optimizer=optimizer, micro_batches=micro_batches)
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, out_sharding), donate_argnums=0)
