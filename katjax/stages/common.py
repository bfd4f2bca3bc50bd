"""Glue shared by the stages: the checked tokenizer, data files, the LM stages' summary."""

from __future__ import annotations

import os

from absl import logging

from katjax.data import write_default_data
from katjax.parallel import is_main_process
from katjax.plan import memory as plan_memory


def make_tokenizer(config, workdir: str | None = None):
  """The run's tokenizer (`config.tokenizer`: "byte", a tokenizer.json path, or "" = the one
  of `config.init_from`), checked against the model's vocabulary and recorded in `workdir`."""
  from katjax.model.hf import check_vocab
  from katjax.train.config import parse
  from katjax.train.init_from import make_tokenizer as resolve
  run = parse(config)
  tok = resolve(run, workdir)
  # A tokenizer with ids past the embedding would train on clamped garbage: fail up front.
  check_vocab(tok, run.model)
  return tok


def data_files(config, workdir: str, stage: str) -> tuple[str, str]:
  """(train, eval) JSONL paths; empty config entries use the embedded synthetic data."""
  train, evals = config.data.train_file, config.data.eval_file  # ConfigDict or RunConfig
  if not train or not evals:
    paths = write_default_data(os.path.join(workdir, "data"))
    train = train or paths[f"{stage}_train"]
    evals = evals or paths[f"{stage}_eval"]
  return train, evals


def report(stage: str, data, summary: dict) -> None:
  """Print what the run did (the demo's output); on process 0 only."""
  if not is_main_process():
    return
  s = data.stats
  losses = summary["losses"]
  print(f"[{stage}] packed {s.sequences} sequences into {s.rows} rows of {s.seq_len} "
        f"(efficiency {s.efficiency:.1%}, {s.split} split, {s.dropped} untrainable pieces "
        f"dropped, {len(data.errors)} bad lines skipped, {s.loss_tokens} loss tokens)")
  if losses:
    steps = sorted(losses)
    print(f"[{stage}] steps {summary['start_step']}->{summary['steps']}: loss " +
          " ".join(f"{k}:{losses[k]:.3f}" for k in steps))
  for k, v in sorted(summary["eval_loss"].items()):
    print(f"[{stage}] eval loss at step {k}: {v:.4f}")
  print(f"[{stage}] skipped steps: {summary['skipped']}; checkpoints and TensorBoard logs in "
        f"{summary['workdir']}")
  logging.info("%s done: %s", stage, {k: v for k, v in summary.items() if k != "state"})


def run_lm_stage(config, workdir: str, stage: str, load) -> dict:
  """Shared body of the LM stages: tokenizer, data files, `load` (load_mid / load_sft), train."""
  from katjax.train.config import parse
  from katjax.train.loop import train_lm  # stages are glue: import lazily

  run = parse(config)
  tok = make_tokenizer(config, workdir)
  train_path, eval_path = data_files(run, workdir, stage)
  seq_len, on_error = run.data.seq_len, run.data.on_error
  train = load(train_path, tok, seq_len, on_error=on_error)
  evals = load(eval_path, tok, seq_len, on_error=on_error)
  summary = train_lm(config, workdir, train, evals, tokenizer=tok)
  report(stage, train, summary)
  return summary


def fit_tree_step(tr, step_fn, tree_sh, extra=()):
  """The run's tree step compiled now and checked against the device memory, or None when no
  budget is known (CPU without `train.memory_budget_gib`).

  A row longer than the mesh can hold stops the run here, before any rollout, naming
  rl.row_tokens and the largest row that fits (`katjax.plan.fit_tree_step`). The budget is
  `train.memory_budget_gib`, else the devices' own limit. extra: float arrays the caller
  adds to the batch (the asynchronous learner's old_logp).
  """
  budget, source = plan_memory.device_memory_budget(tr.mesh.devices.flat,
                                                    tr.run.train.memory_budget_gib)
  if budget is None:
    return None
  rl = tr.run.rl
  return plan_memory.fit_tree_step(step_fn, tr.state, tr.cfg, rows=rl.num_rows,
                                   row_tokens=rl.row_tokens, sharding=tree_sh, budget=budget,
                                   source=source, extra=extra)
