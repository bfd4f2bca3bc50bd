"""Does asynchronous RL (SeamlessFlow) learn as well as synchronous RL? Same steps, same start.

(A benchmark, but it runs the pipeline's stages, so it lives beside them: katjax.bench sits
below katjax.stages in tests/test_layers.py's table.)

    python -m katjax.stages.flow_learning --workdir=DIR [--config=configs/pipeline_tiny.py]
        [--config.rl.eta=2 --config.eval.num_tasks=64 ...]

DIR is a pipeline workdir (`--stage=all`, katjax/stages/all.py). Its stages up to the one
RL starts from (the last trained stage before rl: RFT in pipeline_tiny) are run first if
they are not finished (`all.run(..., until=...)`: a rerun reuses them). Then RL runs twice
from that checkpoint (the "start"), with the pipeline's RL settings
(`pipeline.rl_steps` steps at `pipeline.rl_lr`, the `config.rl` fields), the same seeds and
the same task stream (`stages.rl.task_order`): once `rl.mode="sync"` (stages/rl.py) and once
`rl.mode="async"` (stages/rl_flow.py, at the config's `rl.eta` and `rl.rollout_slots`), each
in a fresh DIR/flow_learning/<mode> (deleted first, so neither resumes an earlier run). Both
are evaluated by the pipeline's evaluation (stages/eval.py with `config.eval`: greedy in
pipeline_tiny, the same `eval.num_tasks` held-out tasks, same seed), as is the start
checkpoint itself. Prints, and writes to DIR/flow_learning.json:

    {"steps": N, "eval_tasks": n, "start_stage": "rft", "start": {success, ci95, ...},
     "sync":  {success, ci95, success_by_level, ..., steps_trained, start_step, init_from,
               wall_s (RL, compilation included), eval_s, reward_curve {step: mean
               reward of the step's trained rollouts}},
     "async": {..., eta, rollout_slots, mean_staleness, trainer_bubble, rollout_idle,
               trajectories_per_s, tokens_per_s, failed_episodes},
     "async_within_sync_interval": sync ci95[0] <= async success <= sync ci95[1],
     "async_below_sync_interval": async success < sync ci95[0],
     "paired": {"async_vs_sync": {only_first, only_second, p}, "sync_vs_start", "async_vs_start"},
     and with config.eval greedy (pipeline_tiny) the same again for one sample per task at
     rl.temperature: "sampled" in start / sync / async, "async_within_sync_interval_sampled",
     "async_below_sync_interval_sampled", "paired_sampled"}

RL needs room to learn for the comparison to mean anything: pipeline_tiny's RL starts from
a 20-step RFT (0.445 greedy) and adds only +0.045, so docs/benchmarks.md starts it from a
10-step RFT (0.120) with `--config.pipeline.rft_steps=10 --config.pipeline.rl_steps=20`.

Greedy success is the pipeline's figure; the sampled one is the policy RL trains and moves
(at the pipeline's settings RL changes greedy success little but sampled success clearly:
docs/benchmarks.md), so it is the more sensitive test of "learns as well".

`paired` counts, on the same held-out tasks, those solved by one policy and not the other,
with the exact McNemar p-value; `reward_gain` is the mean rollout reward of the last quarter
of the steps minus the first quarter's (did RL move the sampled policy at all).

The issue's goal (#16) is "async reaches the synchronous run's success within its 95%
interval in the same number of train steps". The interval is a Wilson interval over the
held-out tasks; it says nothing about the run-to-run spread of RL itself (one seed each),
and async is not bit-reproducible (which episodes finish first depends on timing).
"""

from __future__ import annotations

import json
import os
import shutil
import time

MODES = ("sync", "async")
_EVAL_KEYS = ("success", "ci95", "n_tasks", "success_by_level", "mean_turns",
              "mean_tool_calls", "parallel_call_share", "finish_reasons")
_FLOW_KEYS = ("eta", "mean_staleness", "trainer_bubble", "rollout_idle", "trajectories_per_s",
              "tokens_per_s", "failed_episodes")


def run(config, workdir: str, *, verbose: bool = True) -> dict:
  from katjax.model.tokenizer import Tokenizer
  from katjax.stages import all as pipeline
  from katjax.stages import eval as eval_stage
  from katjax.train.config import parse
  from katjax.train.init_from import load_params

  p = config.pipeline
  start = _start_stage(config)
  if p.rl_steps <= 0:
    raise ValueError(f"pipeline.rl_steps={p.rl_steps} must be >= 1 (the RL steps of each mode)")
  workdir = os.path.abspath(workdir)
  stages = pipeline.run(config, workdir, until=start)  # skips the stages already finished
  paths = pipeline.prepare(config, workdir)  # written by the run above: only the paths
  config = pipeline.with_fields(config, tokenizer=paths["tokenizer"])
  tokenizer = Tokenizer.from_file(paths["tokenizer"])
  held = eval_stage.heldout_tasks(config)
  cfg = parse(config).model
  start_dir = pipeline._finished_workdir(workdir, start, config)  # ValueError if it is gone
  # The policy RL trains: one sample per task at rl.temperature (greedy decoding hides
  # much of what RL changes: docs/pipeline.md), unless config.eval is that already.
  sampled_ev = pipeline.with_fields(config).eval
  with sampled_ev.unlocked():
    sampled_ev.update(temperature=float(config.rl.temperature), samples=1)
  evals = {"": config.eval}
  if (float(config.eval.temperature), int(config.eval.samples)) != (
      float(config.rl.temperature), 1) and float(config.rl.temperature) > 0:
    evals["sampled"] = sampled_ev
  sampler, solved = None, {e: [] for e in evals}  # per eval mode: start, sync, async

  def evaluate(params):
    nonlocal sampler
    t0 = time.perf_counter()
    sampler = pipeline.eval_sampler(sampler, cfg, params, config, tokenizer)
    res = {}
    for e, ev in evals.items():
      m = eval_stage.evaluate(sampler, tokenizer, held, ev, config.rl, per_task=True)
      solved[e].append(m["solved"])
      keys = _EVAL_KEYS if not e else ("success", "ci95", "success_by_level")
      (res.setdefault(e, {}) if e else res).update({k: m[k] for k in keys})
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    return res

  # The start is evaluated here too (not read from its eval.json), so the three figures
  # come from one evaluation setup even when --config.eval.* differs from the pipeline's.
  out = {"steps": int(p.rl_steps), "eval_tasks": len(held), "start_stage": start,
         "start_workdir": start_dir, "start": evaluate(load_params(cfg, start_dir, None))}
  for mode in MODES:
    c = pipeline.with_fields(config)
    with c.unlocked():
      c.rl.mode = mode
    mdir = os.path.join(workdir, "flow_learning", mode)
    shutil.rmtree(mdir, ignore_errors=True)  # a fresh run: never a resume of an earlier one
    if verbose:
      print(f"[flow_learning] rl.mode={mode}: {p.rl_steps} steps from {start_dir}")
    t0 = time.perf_counter()
    params, extra = pipeline.train_stage("rl", c, mdir, start_dir)
    wall = time.perf_counter() - t0
    curve = extra["reward_curve"]
    res = evaluate(params)
    res.update(steps_trained=len(curve), start_step=extra["start_step"], init_from=start_dir,
               wall_s=round(wall, 1), reward_gain=_gain(curve), reward_curve=curve)
    if mode == "async":
      res.update({k: extra["flow"][k] for k in _FLOW_KEYS}, rollout_slots=c.rl.rollout_slots)
    if verbose:
      lo, hi = res["ci95"]
      print(f"[flow_learning] {mode}: success {res['success']:.3f} [{lo:.3f}, {hi:.3f}], "
            f"RL {wall:.0f} s")
    out[mode] = res
  for e in evals:
    sync, asyn = (out[m][e] if e else out[m] for m in ("sync", "async"))
    lo, hi = sync["ci95"]
    sfx = f"_{e}" if e else ""
    out["async_within_sync_interval" + sfx] = bool(lo <= asyn["success"] <= hi)
    out["async_below_sync_interval" + sfx] = bool(asyn["success"] < lo)
    # Paired on the same tasks (more sensitive than the two intervals): the discordant
    # tasks and the exact two-sided McNemar p-value.
    start_s, sync_s, async_s = solved[e]
    out["paired" + sfx] = {"sync_vs_start": eval_stage.paired(sync_s, start_s),
                           "async_vs_start": eval_stage.paired(async_s, start_s),
                           "async_vs_sync": eval_stage.paired(async_s, sync_s)}
  with open(os.path.join(workdir, "flow_learning.json"), "w") as f:
    json.dump(out, f, indent=1)
  if verbose:
    print("[flow_learning] stages before RL: "
          + ", ".join(f"{s['stage']} {s['success']:.3f}" for s in stages["stages"]))
  return out


def _start_stage(config) -> str:
  """The stage RL starts from in the pipeline: the last trained stage before "rl" in
  pipeline.stages (RFT in pipeline_tiny: RL straight from SFT does not learn there)."""
  from katjax.train.config import parse
  p, stages = config.pipeline, parse(config).pipeline.stage_list()
  if "rl" not in stages:
    raise ValueError(f"pipeline.stages={stages} has no rl stage to compare")
  before = [s for s in stages[:stages.index("rl")]
            if s != "base" and getattr(p, f"{s}_steps") > 0]
  if not before:
    raise ValueError("this benchmark starts RL from a trained stage; pipeline.stages "
                     f"{stages} trains none before rl")
  return before[-1]


def _gain(curve: dict) -> float:
  """Mean rollout reward of the last quarter of the steps minus that of the first."""
  r = [curve[k] for k in sorted(curve, key=int)]
  q = max(1, len(r) // 4)
  return round(sum(r[-q:]) / q - sum(r[:q]) / q, 4) if r else 0.0


def main(argv):
  from absl import app

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a pipeline workdir; made if missing)")
  from absl import flags, logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  from katjax.train.config import parse
  try:
    parse(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  out = run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _WORKDIR = flags.DEFINE_string("workdir", None, "the pipeline workdir (stages to SFT are "
                                 "run there if not finished)")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_ROOT, "configs", "pipeline_tiny.py"), "ml_collections config "
      "file (the pipeline's)", lock_config=True)
  app.run(main)
