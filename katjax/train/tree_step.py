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

Context parallelism: on a mesh whose `sequence` axis has n > 1 devices, each row's S tokens
are split over them (`batch_sharding(mesh, 2, length=True)`: rows over data x fsdp, tokens
over sequence) and attention runs as a ring over that axis (`katjax.model.ring_attention`);
everything else is per token. S must be a multiple of n. Tile lists describe whole rows, so
a batch with `attention_tiles` is refused there.
"""

from __future__ import annotations

import functools

import jax

from katjax.core.head_logprobs import head_logprobs
from katjax.core.losses import PolicyLossConfig, tree_policy_loss
from katjax.model import hidden_states
from katjax.model.ring_attention import sequence_size
from katjax.train.step import train_step


def make_tree_loss_fn(model_cfg, loss_cfg: PolicyLossConfig, mesh=None):
  """loss_fn(params, batch, rng) -> (loss_sum, denom, aux sums) for `train_step`.

  mesh: with a `sequence` axis of n > 1 devices, attention is sequence-parallel over it.
  """

  def loss_fn(params, batch, rng):
    del rng
    logp, entropy = tree_logprobs(model_cfg, params, batch, mesh)
    old = batch["old_logp"] if "old_logp" in batch else logp  # stop-gradient in the loss
    loss_sum, metrics = tree_policy_loss(logp, old, batch, loss_cfg, entropy=entropy)
    denom = metrics.pop("denom")
    return loss_sum, denom, metrics

  return loss_fn


def tree_logprobs(model_cfg, params, batch, mesh=None):
  """(logp, entropy) float32[R, S] of the tree tokens under `params` (old / reference).

  Through the output projection in chunks of tokens (`head_logprobs`): the [R, S, vocab]
  logits are never stored, forward or backward. mesh: as `make_tree_loss_fn`.
  """
  check_sequence_batch(batch, sequence_size(mesh))
  h, w = hidden_states(model_cfg, params, batch["tokens"], batch["positions"],
                       batch["subtree_end"], batch.get("attention_tiles"), mesh)
  return head_logprobs(h, w, batch)


def make_tree_step(model_cfg, loss_cfg: PolicyLossConfig, optimizer, *, state_shardings=None,
                   batch_sharding=None, out_sharding=None, micro_batches: int = 1):
  """jit(train_step with the tree loss): (state, batch) -> (state, metrics).

  Shardings as in the SFT loop (`katjax.train.loop`): the state's own shardings, every
  batch array [R, S] sharded over the batch mesh axes (`katjax.parallel.batch_sharding`),
  replicated metrics. Without shardings, a plain jit. The state is donated.

  When batch_sharding's mesh has a `sequence` axis of n > 1 devices the step is sequence-
  parallel: give `batch_sharding(mesh, 2, length=True)` (tokens over `sequence`) and rows
  whose length is a multiple of n.
  """
  mesh = getattr(batch_sharding, "mesh", None)
  mesh = mesh if sequence_size(mesh) > 1 else None
  step = functools.partial(train_step, loss_fn=make_tree_loss_fn(model_cfg, loss_cfg, mesh),
                           optimizer=optimizer, micro_batches=micro_batches)
  if state_shardings is None:
    return jax.jit(step, donate_argnums=0)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, out_sharding), donate_argnums=0)
  return jitted if mesh is None else _CheckedStep(jitted, sequence_size(mesh))


def check_sequence_batch(batch, n: int) -> None:
  """ValueError unless a tree batch can be split over a sequence axis of n devices."""
  if n <= 1:
    return
  s = batch["tokens"].shape[1]
  if s % n:
    raise ValueError(f"tree batch: row length {s} is not divisible by the mesh's sequence "
                     f"axis of {n} devices; make the rows a multiple of {n} tokens "
                     f"(rl.row_tokens)")
  if "attention_tiles" in batch:
    raise ValueError(f"tree batch: attention_tiles list tiles of whole rows; with the "
                     f"sequence axis of {n} devices the rows are split (ring attention): "
                     f"leave attention_tiles out of the batch")


class _CheckedStep:
  """The jitted sequence-parallel step, checking the batch first: jit's own error for a row
  the axis does not divide names shardings and tiling factors, not the row and the axis."""

  def __init__(self, jitted, n: int):
    self._jitted, self._n = jitted, n

  def __call__(self, state, batch):
    check_sequence_batch(batch, self._n)
    return self._jitted(state, batch)

  def lower(self, state, batch):
    check_sequence_batch(batch, self._n)
    return self._jitted.lower(state, batch)
