"""`--stage=eval`: success of a policy on the held-out task split, with a 95% interval.

    python -m katjax.launch --stage=eval --config=configs/pipeline_tiny.py \
        --config.init_from=WORKDIR_OF_A_STAGE --workdir=OUT

The held-out tasks (`katjax.data.lookup.generate_tasks(split="heldout")`, or
`config.eval.tasks_file`) are checked against the training tasks of the same config before
anything runs: an evaluation task that also occurs in training data, or that lies outside
the held-out split, is a ValueError. All episodes run concurrently through one batched
sampler (`katjax.rollout.batch.run_episodes`: one generate call per turn for all of them).

Modes: greedy (`eval.temperature` 0, one episode per task) and sampled (`eval.samples` = k
episodes per task at `eval.temperature`; success is pass@k: at least one of the k solved
it). The agent limits (turns, tokens) are the RL stage's (`config.rl`), so every stage is
judged under the limits RL trains with. Reported:
success with its Wilson 95% interval over tasks, mean turns, mean tool calls, the share of
turns with parallel tool calls, tokens per episode (all and generated), the share of
episodes per finish reason, and success per difficulty level. Same seed, same numbers.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time

import numpy as np

from katjax.envs.base import load_tasks, make_env
from katjax.rollout.agent import AgentLimits
from katjax.rollout.batch import run_episodes
from katjax.rollout.sampler import SamplingParams

__all__ = ["wilson_interval", "paired", "evaluate", "heldout_tasks", "train_tasks", "run"]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (95% for the default z)."""
  if n <= 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # At p = 0 (p = 1) the lower (upper) end is exactly 0 (1); say so despite rounding.
  lo = 0.0 if successes == 0 else max(0.0, centre - half)
  hi = 1.0 if successes == n else min(1.0, centre + half)
  return (lo, hi)


def paired(a, b) -> dict:
  """{"only_first", "only_second", "p"}: tasks solved by one policy and not the other (two
  per-task "solved" lists over the same tasks), and the exact McNemar p-value (two-sided
  binomial test of the discordant pairs at 1/2). More sensitive than two Wilson intervals:
  the tasks both solve, or both fail, carry no noise between the policies."""
  if len(a) != len(b):
    raise ValueError(f"paired: {len(a)} and {len(b)} tasks; both must be over the same tasks")
  x = sum(bool(u) and not v for u, v in zip(a, b))
  y = sum(bool(v) and not u for u, v in zip(a, b))
  n = x + y
  p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(x, y) + 1)) / 2 ** n)
  return {"only_first": x, "only_second": y, "p": round(p, 4)}


def evaluate(sampler, tokenizer, tasks: list[dict], ev, rl, *, on_turn=None,
             per_task: bool = False) -> dict:
  """Runs the evaluation episodes of `tasks`; returns the metrics dict.

  ev: config.eval (seed, temperature: 0 = greedy, samples: k of pass@k, ignored when
  greedy); rl: config.rl (env, max_turns, max_new_tokens, max_tokens). per_task: also
  "solved", one bool per task in order (for paired comparisons of two policies).
  """
  greedy = float(ev.temperature) == 0.0
  k = 1 if greedy else int(ev.samples)
  if k < 1:
    raise ValueError(f"config.eval.samples must be >= 1, got {ev.samples!r}")
  sampling = SamplingParams(temperature=float(ev.temperature), max_new_tokens=rl.max_new_tokens)
  limits = AgentLimits(max_turns=rl.max_turns, max_tokens=rl.max_tokens,
                       max_new_tokens=rl.max_new_tokens)
  runs = [t for t in tasks for _ in range(k)]
  envs = [make_env(rl.env) for _ in runs]
  try:
    rollouts = run_episodes(sampler, tokenizer, envs, runs, sampling, limits, seed=ev.seed,
                            on_turn=on_turn)
  finally:
    for env in envs:
      env.close()
  metrics = summarize(tasks, rollouts, k)
  if per_task:
    metrics["solved"] = [bool(x) for x in _solved(rollouts, len(tasks), k)]
  return metrics


def _solved(rollouts, n: int, k: int) -> np.ndarray:
  return np.asarray([r.reward > 0.5 for r in rollouts]).reshape(n, k).any(axis=1)


def summarize(tasks: list[dict], rollouts, k: int) -> dict:
  """Metrics of len(tasks) * k rollouts (task-major)."""
  solved = _solved(rollouts, len(tasks), k)
  turns = np.asarray([r.num_turns for r in rollouts], np.float64)
  reasons = collections.Counter(r.finish_reason for r in rollouts)
  levels = collections.defaultdict(list)
  for t, s in zip(tasks, solved):
    levels[str(t.get("level", "all"))].append(bool(s))
  n = len(tasks)
  return {
      "n_tasks": n, "k": k, "success": float(solved.mean()) if n else 0.0,
      "ci95": list(wilson_interval(int(solved.sum()), n)),
      "mean_turns": float(turns.mean()),
      "mean_tool_calls": float(np.mean([r.num_tool_calls for r in rollouts])),
      "parallel_call_share": float(sum(r.parallel_turns for r in rollouts))
                             / max(float(turns.sum()), 1.0),
      "tokens_per_episode": float(np.mean([len(r.tokens) for r in rollouts])),
      "generated_tokens_per_episode": float(np.mean([int(r.loss_mask.sum())
                                                     for r in rollouts])),
      "finish_reasons": {kk: v / len(rollouts) for kk, v in sorted(reasons.items())},
      "success_by_level": {kk: float(np.mean(v)) for kk, v in sorted(levels.items())},
  }


def heldout_tasks(config) -> list[dict]:
  """The evaluation tasks: `eval.tasks_file`, else the generated held-out split; checked
  against the training tasks (overlap or a task outside the held-out split: ValueError)."""
  from katjax.data import lookup
  ev = config.eval
  if getattr(ev, "tasks_file", ""):
    tasks = load_tasks(ev.tasks_file, required=("level", "keys", "table", "answer"))
  else:
    tasks = lookup.generate_tasks(ev.num_tasks, split="heldout", seed=ev.seed)
  lookup.check_disjoint(tasks, train_tasks(config))
  return tasks


def train_tasks(config) -> list[dict]:
  """Every task any training stage of `config` sees (SFT, RFT and RL draw from these)."""
  from katjax.data import lookup
  rl = config.rl
  if rl.tasks_file:
    return load_tasks(rl.tasks_file)
  return lookup.generate_tasks(rl.num_tasks, split="train", seed=rl.task_seed)


def run(config, workdir: str) -> dict:
  """Loads the policy of `config.init_from` (random weights when empty), evaluates it on
  the held-out split and writes `eval.json` into `workdir`."""
  import jax

  from katjax import model as kmodel
  from katjax.rollout.sampler import Sampler
  from katjax.stages.common import make_tokenizer
  from katjax.train.config import parse
  from katjax.train.init_from import load_params
  t0 = time.perf_counter()
  tasks = heldout_tasks(config)
  cfg = parse(config).model
  tokenizer = make_tokenizer(config, workdir)
  params = (load_params(cfg, config.init_from, None) if config.init_from
            else kmodel.init(cfg, jax.random.split(jax.random.PRNGKey(config.train.seed))[0]))
  sampler = Sampler(cfg, params, max_len=config.rl.max_tokens, tokenizer=tokenizer,
                    max_batch=256)
  metrics = evaluate(sampler, tokenizer, tasks, config.eval, config.rl)
  metrics["wall_s"] = time.perf_counter() - t0
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(format_metrics("eval", metrics))
  return metrics


def format_metrics(name: str, m: dict) -> str:
  lo, hi = m["ci95"]
  levels = " ".join(f"L{k}={v:.2f}" for k, v in m["success_by_level"].items())
  return (f"[{name}] success {m['success']:.3f} [{lo:.3f}, {hi:.3f}] over {m['n_tasks']} "
          f"tasks (k={m['k']}); turns {m['mean_turns']:.2f}, tool calls "
          f"{m['mean_tool_calls']:.2f}, parallel turns {m['parallel_call_share']:.2f}, "
          f"tokens {m['tokens_per_episode']:.0f}; {levels}; finish {m['finish_reasons']}")
