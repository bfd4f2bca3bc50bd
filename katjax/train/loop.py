"""The training loop shared by mid-training and SFT: sharded jit step, eval, checkpoints, logs.

`train_lm(config, workdir, train_data, eval_data)` takes the shared setup of
`katjax.train.trainer.Trainer` (mesh, the possibly restored or `init_from` state, shardings,
checkpoints, logger, cadence), jits one step with in/out shardings and runs
`config.train.steps` steps, logging to TensorBoard + `metrics.jsonl` + a progress bar and
saving orbax checkpoints with the grain iterator state, so a killed run resumed from
`workdir` continues bit-for-bit.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from katjax.data.pipeline import PackedData, batch_dataset, make_iterator
from katjax.parallel import make_mesh, replicated
from katjax.train.config import parse
from katjax.train.losses import lm_loss
from katjax.train.mfu import MfuMeter
from katjax.train.step import train_step
from katjax.train.trainer import Trainer


def train_lm(config, workdir: str, train_data: PackedData, eval_data: PackedData | None = None,
             *, tokenizer=None, params=None, verbose: bool = True) -> dict:
  """Run (or resume) training; returns a summary {start_step, steps, losses, eval_loss, ...}.

  tokenizer: recorded with each checkpoint (see `Trainer.setup`); params: explicit step-0
  params instead of config.init_from / random.
  """
  run = parse(config)
  tc = run.train
  it = make_iterator(batch_dataset(train_data, run.data.batch_size, seed=run.data.seed))
  # Fail on a batch the mesh cannot split before any weight is read.
  _check_batch_fits_mesh(run.data.batch_size, tc.micro_batches,
                         make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor,
                                   sequence=run.mesh.sequence))
  tr = Trainer.setup(config, workdir, it, tokenizer, params=params, verbose=verbose)
  state, batch_sh = tr.state, tr.batch_sharding
  loss_fn = functools.partial(lm_loss, tr.cfg)
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=loss_fn, optimizer=tr.optimizer,
                        micro_batches=tc.micro_batches),
      in_shardings=(tr.state_shardings, batch_sh),
      out_shardings=(tr.state_shardings, replicated(tr.mesh)), donate_argnums=0)
  eval_fn = _make_eval(loss_fn, tr.state_shardings.params, batch_sh, tr.mesh)
  summary = {"start_step": tr.start, "losses": {}, "eval_loss": {}, "skipped": 0,
             "workdir": workdir}
  t0, tokens = time.perf_counter(), 0
  mfu = MfuMeter(tr.cfg, tr.run.train.peak_flops)  # katjax/train/mfu.py
  for step in range(tr.start, tc.steps):
    batch = _to_global(next(it), batch_sh)
    state, metrics = step_fn(state, batch)
    tokens += int(batch["tokens"].size)  # global size: every host holds only its rows
    mfu.add(batch)
    done = step + 1
    if tr.is_log_step(done):
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - t0
      metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
      metrics.update(mfu.take(elapsed))
      summary["losses"][done] = float(metrics["loss"])
      summary["skipped"] += int(metrics["skipped"])
      tr.log.write(done, metrics)
      t0, tokens = time.perf_counter(), 0
    if eval_data is not None and tc.eval_every and (done % tc.eval_every == 0
                                                    or done == tc.steps):
      summary["eval_loss"][done] = ev = eval_fn(state.params, eval_data, run.data.batch_size,
                                                tc.eval_batches)
      tr.log.write(done, {"loss": ev}, prefix="eval")
    tr.end_step(done, state, it)
  tr.close()
  summary["steps"] = tc.steps
  summary["state"] = state
  return summary


def _check_batch_fits_mesh(batch_size: int, micro_batches: int, mesh) -> None:
  """Fail early, naming the fields, when a batch cannot be split over the data devices."""
  if mesh.shape["sequence"] > 1:
    # The sequence devices would each repeat the whole rows' work here.
    raise ValueError(f"config.mesh.sequence={mesh.shape['sequence']} splits RL tree rows "
                     f"(--stage=rl / rft); mid-training and SFT keep rows whole: set "
                     f"--config.mesh.sequence=1 and give those devices to data or fsdp")
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

  def run(params, data, batch_size, max_batches):
    ds = batch_dataset(data, batch_size, shuffle=False, repeat=False)
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
