"""Does asynchronous RL (SeamlessFlow) learn as well as synchronous RL? Same steps, same start.

(A benchmark, but it runs the pipeline's stages, so it lives beside them: katjax.bench sits
below katjax.stages in tests/test_layers.py's table.)

    python -m katjax.stages.flow_learning --workdir=DIR [--config=configs/pipeline_tiny.py]
        [--seeds=0,1,2] [--config.rl.eta=2 --config.eval.num_tasks=64 ...]

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
a 20-step RFT (0.445 greedy) and adds +0.050 (10 tasks gained, none lost, paired), which
docs/benchmarks.md compares over three seeds; it also starts RL from a 10-step RFT (0.120,
more room, less stable) with `--config.pipeline.rft_steps=10 --config.pipeline.rl_steps=20`.

Greedy success is the pipeline's figure; the sampled one is the policy RL trains and moves
(at the pipeline's settings RL changes greedy success little but sampled success clearly:
docs/benchmarks.md), so it is the more sensitive test of "learns as well".

`paired` counts, on the same held-out tasks, those solved by one policy and not the other,
with the exact McNemar p-value; `reward_gain` is the mean rollout reward of the last quarter
of the steps minus the first quarter's (did RL move the sampled policy at all).

The issue's goal (#16) is "async reaches the synchronous run's success within its 95%
interval in the same number of train steps". One run's interval is a Wilson interval over
the held-out tasks; it says nothing about the spread of RL runs themselves, which is large
here (sync from the 10-step RFT at lr 2e-3: 0.49 at seed 0, 0.00 at seed 1, where it
collapses), and async is not bit-reproducible (which episodes finish first depends on
timing). So `--seeds=0,1,2` trains a sync and an async run per seed (`train.seed`: it sets
the rollouts' sampling seeds), in DIR/flow_learning/seed<k>/<mode>, and the JSON then holds

    {"steps", "eval_tasks", "start_stage", "start_workdir", "start", "seeds": [...],
     "runs": {"<seed>": {"sync", "async", "async_within_sync_interval", ..., "paired"}},
     "across_seeds": {"eval" (config.eval) and "sampled": {"sync" / "async": {success (per
       seed), mean, sd, ci95 (t-interval of the mean over seeds)},
       "async_mean_within_sync_interval", "async_mean_below_sync_interval",
       "paired_pooled" (McNemar over every (seed, task) pair)}}}

and the goal's test over seeds is "async_mean_within_sync_interval".
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np

MODES = ("sync", "async")
_EVAL_KEYS = ("success", "ci95", "n_tasks", "success_by_level", "mean_turns",
              "mean_tool_calls", "parallel_call_share", "finish_reasons")
_FLOW_KEYS = ("eta", "mean_staleness", "trainer_bubble", "rollout_idle", "trajectories_per_s",
              "tokens_per_s", "failed_episodes")


def run(config, workdir: str, *, seeds=None, verbose: bool = True) -> dict:
  """The comparison (module docstring); seeds: the RL runs' `train.seed`s (default: the
  config's one seed). Several seeds: one sync and one async run per seed, per-seed results in
  "runs" and their spread in "across_seeds"."""
  from katjax.model.tokenizer import Tokenizer
  from katjax.stages import all as pipeline
  from katjax.stages import eval as eval_stage
  from katjax.train.config import parse
  from katjax.train.init_from import load_params

  p = config.pipeline
  start = _start_stage(config)
  if p.rl_steps <= 0:
    raise ValueError(f"pipeline.rl_steps={p.rl_steps} must be >= 1 (the RL steps of each mode)")
  seeds = [int(config.train.seed)] if seeds is None else [int(x) for x in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"flow_learning seeds must be distinct and at least one, got {seeds}")
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
  sampler = None

  def evaluate(params):
    """(metrics, {eval mode: per-task solved})."""
    nonlocal sampler
    t0 = time.perf_counter()
    sampler = pipeline.eval_sampler(sampler, cfg, params, config, tokenizer)
    res, solved = {}, {}
    for e, ev in evals.items():
      m = eval_stage.evaluate(sampler, tokenizer, held, ev, config.rl, per_task=True)
      solved[e] = m["solved"]
      keys = _EVAL_KEYS if not e else ("success", "ci95", "success_by_level")
      (res.setdefault(e, {}) if e else res).update({k: m[k] for k in keys})
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    return res, solved

  # The start is evaluated here too (not read from its eval.json), so the three figures
  # come from one evaluation setup even when --config.eval.* differs from the pipeline's.
  start_res, start_solved = evaluate(load_params(cfg, start_dir, None))
  out = {"steps": int(p.rl_steps), "eval_tasks": len(held), "start_stage": start,
         "start_workdir": start_dir, "start": start_res}
  runs, solved = {}, {}
  for seed in seeds:
    root = os.path.join(workdir, "flow_learning")
    if len(seeds) > 1:
      root = os.path.join(root, f"seed{seed}")
    runs[seed], solved[seed] = {}, {}
    for mode in MODES:
      c = pipeline.with_fields(config)
      with c.unlocked():
        c.rl.mode, c.train.seed = mode, seed
      mdir = os.path.join(root, mode)
      shutil.rmtree(mdir, ignore_errors=True)  # a fresh run: never a resume of an earlier one
      if verbose:
        print(f"[flow_learning] rl.mode={mode} seed {seed}: {p.rl_steps} steps from {start_dir}")
      t0 = time.perf_counter()
      params, extra = pipeline.train_stage("rl", c, mdir, start_dir)
      wall = time.perf_counter() - t0
      curve = extra["reward_curve"]
      res, solved[seed][mode] = evaluate(params)
      res.update(steps_trained=len(curve), start_step=extra["start_step"], init_from=start_dir,
                 wall_s=round(wall, 1), reward_gain=_gain(curve), reward_curve=curve)
      if mode == "async":
        res.update({k: extra["flow"][k] for k in _FLOW_KEYS}, rollout_slots=c.rl.rollout_slots)
      if verbose:
        lo, hi = res["ci95"]
        print(f"[flow_learning] {mode} seed {seed}: success {res['success']:.3f} "
              f"[{lo:.3f}, {hi:.3f}], RL {wall:.0f} s")
      runs[seed][mode] = res
    for e in evals:
      sync, asyn = (runs[seed][m][e] if e else runs[seed][m] for m in MODES)
      lo, hi = sync["ci95"]
      sfx = f"_{e}" if e else ""
      runs[seed]["async_within_sync_interval" + sfx] = bool(lo <= asyn["success"] <= hi)
      runs[seed]["async_below_sync_interval" + sfx] = bool(asyn["success"] < lo)
      # Paired on the same tasks (more sensitive than the two intervals): the discordant
      # tasks and the exact two-sided McNemar p-value.
      got = {m: solved[seed][m][e] for m in MODES}
      runs[seed]["paired" + sfx] = {
          "sync_vs_start": eval_stage.paired(got["sync"], start_solved[e]),
          "async_vs_start": eval_stage.paired(got["async"], start_solved[e]),
          "async_vs_sync": eval_stage.paired(got["async"], got["sync"])}
  if len(seeds) == 1:
    out.update(runs[seeds[0]])
  else:
    out.update(seeds=seeds, runs={str(k): v for k, v in runs.items()},
               across_seeds={e or "eval": _across_seeds(runs, solved, e) for e in evals})
  with open(os.path.join(workdir, "flow_learning.json"), "w") as f:
    json.dump(out, f, indent=1)
  if verbose:
    print("[flow_learning] stages before RL: "
          + ", ".join(f"{s['stage']} {s['success']:.3f}" for s in stages["stages"]))
  return out


def _across_seeds(runs: dict, solved: dict, e: str) -> dict:
  """Sync and async over seeds, for eval mode e: per-seed success, mean, sample standard
  deviation and the t-interval of the mean (95%: the spread of RL runs themselves, which a
  single run's Wilson interval over tasks does not see); the goal's test (async's mean
  inside sync's interval) and the pooled paired count over (seed, task)."""
  from scipy import stats

  from katjax.stages import eval as eval_stage

  out = {}
  for m in MODES:
    x = np.asarray([(runs[s][m][e] if e else runs[s][m])["success"] for s in runs])
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(x) - 1)) * sd / math.sqrt(len(x))
    out[m] = {"success": [round(float(v), 4) for v in x], "mean": round(float(x.mean()), 4),
              "sd": round(sd, 4), "ci95": [round(float(x.mean()) - half, 4),
                                          round(float(x.mean()) + half, 4)]}
  lo, hi = out["sync"]["ci95"]
  out["async_mean_within_sync_interval"] = bool(lo <= out["async"]["mean"] <= hi)
  out["async_mean_below_sync_interval"] = bool(out["async"]["mean"] < lo)
  pooled = {m: [v for s in runs for v in solved[s][m][e]] for m in MODES}
  out["paired_pooled"] = eval_stage.paired(pooled["async"], pooled["sync"])
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
  try:
    seeds = None if _SEEDS.value is None else [int(x) for x in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}") from e
  out = run(_CONFIG.value, _WORKDIR.value, seeds=seeds)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _WORKDIR = flags.DEFINE_string("workdir", None, "the pipeline workdir (stages to SFT are "
                                 "run there if not finished)")
  _SEEDS = flags.DEFINE_list("seeds", None, "train.seed of each pair of RL runs (e.g. 0,1,2); "
                             "default the config's")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_ROOT, "configs", "pipeline_tiny.py"), "ml_collections config "
      "file (the pipeline's)", lock_config=True)
  app.run(main)
