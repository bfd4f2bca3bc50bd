"""The one trainer setup that every training stage shares (mid, SFT: train/loop.py; RL, RFT:
stages/rl.py).

`Trainer.setup(config, workdir, data_iter, tokenizer)` builds, in this order: the typed run
config (`train.config.parse`), the mesh, the optimizer, the step-0 params (random, or
`config.init_from`: a previous stage's workdir or a Hugging Face folder), the sharded
`TrainState`, its shardings, the Checkpointer (resuming from the workdir's own latest
checkpoint when it has one: a resumed run never reads init_from again) and the
MetricsLogger. A loop then only computes its batches and steps, and calls `end_step` for the
one log / checkpoint cadence (`train.log_every`, `train.checkpoint_every`, always at the last
step). Checkpoints record the config with the resolved tokenizer ("byte" or
"tokenizer.json", the copy in the workdir), so a later stage or an export can find it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax

from katjax import model as kmodel
from katjax.parallel import (batch_sharding, make_mesh, replicated, shard_params,
                             train_state_shardings)
from katjax.train import init_from as init_from_lib
from katjax.train.checkpoint import Checkpointer
from katjax.train.config import RunConfig, parse, to_dict
from katjax.train.metrics import MetricsLogger
from katjax.train.state import TrainState, make_optimizer


@dataclasses.dataclass
class Trainer:
  """Everything a training loop needs besides its step function and its data."""

  run: RunConfig
  cfg: kmodel.ModelConfig
  mesh: Any
  optimizer: Any
  state: TrainState
  state_shardings: Any
  batch_sharding: Any
  ckpt: Checkpointer
  log: MetricsLogger
  start: int  # first step to run (> 0 when resumed)
  workdir: str
  saved_config: dict  # what each checkpoint records

  @classmethod
  def setup(cls, config, workdir: str, data_iter, tokenizer=None, *, params=None,
            verbose: bool = True) -> "Trainer":
    """Build (or resume) the run; `data_iter` is checkpointed and restored with the state.

    params: explicit step-0 params (wins over config.init_from; unused when resuming).
    """
    run = parse(config)
    cfg, tc = run.model, run.train
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor,
                     sequence=run.mesh.sequence)
    optimizer = make_optimizer(run.optimizer)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(tc.seed))
    ckpt = Checkpointer(os.path.join(workdir, init_from_lib.CHECKPOINTS), keep=tc.keep,
                        async_save=tc.async_checkpoint)
    resuming = ckpt.latest_step() is not None
    if params is None and run.init_from and not resuming:
      # A resumed run restores its own params below: the source is read only at step 0.
      params = init_from_lib.load_params(cfg, run.init_from, mesh)
    if params is None:
      params = kmodel.init(cfg, init_key)
    params = shard_params(params, kmodel.logical_axes(cfg), mesh)
    create = functools.partial(TrainState.create, optimizer=optimizer)
    key = jax.device_put(state_key, replicated(mesh))
    # Adam's moments sharded like the params (jit alone would replicate them on every device)
    state_sh = train_state_shardings(optimizer, jax.eval_shape(create, params, rng=key),
                                     jax.tree.map(lambda x: x.sharding, params), mesh)
    state = jax.jit(create, out_shardings=state_sh)(params, rng=key)
    start = 0
    if resuming:
      state, _ = ckpt.restore(state, data_iter)
      start = int(state.step)
    log = MetricsLogger(os.path.join(workdir, "logs"), tc.steps, start, enabled=verbose)
    if start:
      log.print(f"resumed from step {start} ({ckpt.directory})")
    saved = to_dict(run)  # every field, defaults included
    if tokenizer is not None:
      saved["tokenizer"] = init_from_lib.tokenizer_spec(tokenizer)
    return cls(run=run, cfg=cfg, mesh=mesh, optimizer=optimizer, state=state,
               state_shardings=jax.tree.map(lambda x: x.sharding, state),
               batch_sharding=batch_sharding(mesh, 2), ckpt=ckpt, log=log, start=start,
               workdir=workdir, saved_config=saved)

  @property
  def steps(self) -> int:
    return self.run.train.steps

  def is_log_step(self, done: int) -> bool:
    """Log after step `done` (1-based)?"""
    return done % self.run.train.log_every == 0 or done == self.steps

  def end_step(self, done: int, state: TrainState, data_iter) -> None:
    """Advance the progress bar; checkpoint on the cadence and at the last step."""
    self.state = state
    self.log.advance(1)
    if done % self.run.train.checkpoint_every == 0 or done == self.steps:
      self.ckpt.save(done, state, data_iter, self.saved_config, force=done == self.steps)

  def close(self) -> None:
    self.ckpt.close()
    self.log.close()
