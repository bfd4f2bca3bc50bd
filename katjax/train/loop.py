"""The training loop shared by mid-training and SFT: sharded jit step, eval, checkpoints, logs.

`train_lm(config, workdir, train_data, eval_data)` builds the mesh, the (possibly restored)
train state (at step 0 random weights, or the HF folder `config.init_from`), one jitted step
with in/out shardings, and runs `config.train.steps` steps, logging to TensorBoard +
`metrics.jsonl` + a progress bar and saving orbax checkpoints with the grain iterator state,
so a killed run resumed from `workdir` continues bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from katjax import model as kmodel
from katjax.data.pipeline import PackedData, batch_dataset, make_iterator
from katjax.parallel import (batch_sharding, make_mesh, replicated, shard_params,
                             train_state_shardings)
from katjax.train.checkpoint import Checkpointer
from katjax.train.init_from import init_from_path, load_params
from katjax.train.losses import lm_loss
from katjax.train.metrics import MetricsLogger
from katjax.train.mfu import MfuMeter
from katjax.train.state import TrainState, make_optimizer
from katjax.train.step import train_step


def model_config(config) -> kmodel.ModelConfig:
  """ModelConfig from `config.model` (a ConfigDict of ModelConfig fields)."""
  known = {f.name for f in dataclasses.fields(kmodel.ModelConfig)}
  fields = dict(config.model.items())
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.model: unknown field(s) {unknown}")
  return kmodel.ModelConfig(**fields)


def train_lm(config, workdir: str, train_data: PackedData, eval_data: PackedData | None = None,
             *, params=None, verbose: bool = True) -> dict:
  """Run (or resume) training; returns a summary {start_step, steps, losses, eval_loss, ...}."""
  cfg = model_config(config)
  tc = config.train
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  _check_batch_fits_mesh(config.data.batch_size, tc.micro_batches, mesh)
  optimizer = make_optimizer(config.optimizer)
  rng = jax.random.PRNGKey(tc.seed)
  init_key, state_key = jax.random.split(rng)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep,
                      async_save=tc.async_checkpoint)
  resuming = ckpt.latest_step() is not None
  if params is None and init_from_path(config) and not resuming:
    # A resumed run restores its own params below: the HF weights are read only at step 0.
    params = load_params(cfg, init_from_path(config), mesh)
  if params is None:
    params = kmodel.init(cfg, init_key)
  params = shard_params(params, kmodel.logical_axes(cfg), mesh)
  create = functools.partial(TrainState.create, optimizer=optimizer)
  key = jax.device_put(state_key, replicated(mesh))
  # Adam's moments sharded like the params (jit alone would replicate them on every device)
  state_sh = train_state_shardings(optimizer, jax.eval_shape(create, params, rng=key),
                                   jax.tree.map(lambda x: x.sharding, params), mesh)
  state = jax.jit(create, out_shardings=state_sh)(params, rng=key)
  batch_sh = batch_sharding(mesh, 2)
  loss_fn = functools.partial(lm_loss, cfg)
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer,
                        micro_batches=tc.micro_batches),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(mesh)),
      donate_argnums=0)

  it = make_iterator(batch_dataset(train_data, config.data.batch_size, seed=config.data.seed))
  start = 0
  if resuming:
    state, _ = ckpt.restore(state, it)
    start = int(state.step)
  log = MetricsLogger(os.path.join(workdir, "logs"), tc.steps, start, enabled=verbose)
  if start:
    log.print(f"resumed from step {start} ({ckpt.directory})")
  eval_fn = _make_eval(loss_fn, state_sh.params, batch_sh, mesh)
  summary = {"start_step": start, "losses": {}, "eval_loss": {}, "skipped": 0,
             "workdir": workdir}
  t0, tokens, last_logged = time.perf_counter(), 0, start
  mfu = MfuMeter(cfg, tc.get("peak_flops"))  # train.peak_flops: FLOP/s per device (optional)
  for step in range(start, tc.steps):
    batch = _to_global(next(it), batch_sh)
    state, metrics = step_fn(state, batch)
    tokens += int(batch["tokens"].size)  # global size: every host holds only its rows
    mfu.add(batch)
    done = step + 1
    if done % tc.log_every == 0 or done == tc.steps:
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - t0
      metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
      metrics.update(mfu.take(elapsed))
      summary["losses"][done] = float(metrics["loss"])
      summary["skipped"] += int(metrics["skipped"])
      log.write(done, metrics)
      t0, tokens = time.perf_counter(), 0
    log.advance(done - last_logged)
    last_logged = done
    if eval_data is not None and tc.eval_every and (done % tc.eval_every == 0
                                                    or done == tc.steps):
      summary["eval_loss"][done] = ev = eval_fn(state.params, eval_data, config, tc.eval_batches)
      log.write(done, {"loss": ev}, prefix="eval")
    if done % tc.checkpoint_every == 0 or done == tc.steps:
      ckpt.save(done, state, it, config.to_dict(), force=done == tc.steps)
  ckpt.close()
  log.close()
  summary["steps"] = tc.steps
  summary["state"] = state
  return summary


def _check_batch_fits_mesh(batch_size: int, micro_batches: int, mesh) -> None:
  """Fail early, naming the fields, when a batch cannot be split over the data devices."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % micro_batches or (batch_size // micro_batches) % shards:
    raise ValueError(
        f"data.batch_size={batch_size} with train.micro_batches={micro_batches} cannot be "
        f"split over the {shards} data x fsdp devices of mesh {dict(mesh.shape)}: each "
        f"micro-batch needs a multiple of {shards} rows; change --config.data.batch_size or "
        f"--config.mesh.data / --config.mesh.fsdp")


def _make_eval(loss_fn, params_sh, batch_sh, mesh):
  @functools.partial(jax.jit, in_shardings=(params_sh, batch_sh),
                     out_shardings=replicated(mesh))
  def eval_batch(params, batch):
    loss_sum, denom, _ = loss_fn(params, batch, None)
    return jnp.stack([loss_sum, denom])

  def run(params, data, config, max_batches):
    ds = batch_dataset(data, config.data.batch_size, shuffle=False, repeat=False)
    total = np.zeros(2)
    for i, batch in enumerate(ds):
      if i >= max_batches:
        break
      total += np.asarray(eval_batch(params, _to_global(batch, batch_sh)), np.float64)
    return float(total[0] / max(total[1], 1.0))

  return run


def _to_global(local_batch, sharding):
  # Each host holds its slice of the global batch; assemble the global jax.Array.
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
