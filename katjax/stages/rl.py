"""Stage 4, synchronous form: agentic RL on an environment, trained as pruned prefix trees.

Each step: take `rl.tasks_per_step` tasks (a grain iterator over the task list, saved with
the checkpoint so a resumed run continues the same task order), run `rl.group_size`
rollouts of each with the in-process `Sampler` holding the current weights and the agent
loop, turn the environment's rewards into GRPO advantages per group, merge each group into a
prefix tree, prune the step's forest to the batch (`rl.num_rows` x `rl.row_tokens`) by
entropy, take one tree-loss train step, and hand the new weights to the sampler (no
recompilation). The setup (mesh, state, init_from, checkpoints, logs, cadence) is the
shared `katjax.train.trainer.Trainer`, as for mid-training and SFT. Rollout and training
alternate in one process: this is the on-policy schedule;
`bubble` (the share of wall time the trainer waits for rollouts) is logged. The asynchronous
schedule (`rl.mode="async"`, SeamlessFlow) is `stages/rl_flow.py`.
"""

from __future__ import annotations

import dataclasses
import time

import grain
import jax
import numpy as np

from katjax.core.advantages import grpo_advantages
from katjax.core.prune import PruneConfig, prune_batch
from katjax.envs.base import load_tasks, make_env
from katjax.parallel import batch_sharding, is_main_process, make_mesh, replicated
from katjax.rollout.agent import AgentLimits
from katjax.rollout.batch import run_episodes
from katjax.rollout.sampler import Sampler, SamplingParams
from katjax.stages.common import fit_tree_step, make_tokenizer
from katjax.train.config import RLConfig, parse
from katjax.train.mfu import MfuMeter
from katjax.train.trainer import Trainer
from katjax.train.tree_step import make_tree_step


def run(config, workdir: str) -> dict:
  summary = train_rl(config, workdir)
  rewards = summary["reward_mean"]
  first, last = (rewards[min(rewards)], rewards[max(rewards)]) if rewards else (None, None)
  if is_main_process():
    print(f"rl: steps {summary['start_step']}->{summary['steps']}, mean reward first/last "
          f"logged {first} / {last}, workdir {workdir}")
  return summary


def load_rl_tasks(rl: RLConfig) -> list[dict]:
  """`rl.tasks_file` (JSONL) or, when empty, `rl.num_tasks` generated tasks (arithmetic, or
  the training split of lookup, each with its optimal episode as RFT's `teacher`)."""
  if rl.tasks_file:
    return load_tasks(rl.tasks_file)
  if rl.env == "lookup":
    from katjax.data import lookup
    return [dict(t, teacher=lookup.teacher_episode(t))
            for t in lookup.generate_tasks(rl.num_tasks, split="train", seed=rl.task_seed)]
  if rl.env != "arithmetic":
    raise ValueError(f"rl.tasks_file is empty and rl.env={rl.env!r} has no task generator; "
                     f"give --config.rl.tasks_file")
  from katjax.envs.toy import generate_tasks
  return generate_tasks(rl.num_tasks, seed=rl.task_seed)


def task_order(tasks: list[dict], rl: RLConfig):
  """The tasks in the order RL trains on them, sync and async alike (a grain MapDataset):
  shuffled by rl.task_seed, as generated task lists cycle through the levels."""
  return grain.MapDataset.source(tasks).shuffle(seed=rl.task_seed)


def collect_groups(sampler, tokenizer, tasks, rl: RLConfig, *, step: int, seed: int = 0,
                   rft=None) -> tuple[list, dict]:
  """Rollouts of every task -> (groups of core.tree.Trajectory with advantages, stats).

  The whole of rollout collection: the loop in `train_rl` only prunes, steps and logs what
  this returns (so batching the episodes of a step is a change here alone).

  rft: None (the environment's reward) or a `katjax.stages.rft.RftRewards`: a deviation
  monitor per rollout, rewards relative to the task's ground truth, and the teacher
  trajectory as one more (off-policy) branch of the group's tree.
  seed: the run's seed (`train.seed`): runs with different seeds sample different rollouts
  (seed 0 keeps the seeds of the runs before it was added).
  """
  sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p,
                            max_new_tokens=rl.max_new_tokens)
  limits = AgentLimits(max_turns=rl.max_turns, max_tokens=rl.max_tokens,
                       max_new_tokens=rl.max_new_tokens)
  # Every rollout of the step runs in lock-step: one sampler call per turn serves them all.
  runs = [(t, g) for t in range(len(tasks)) for g in range(rl.group_size)]
  envs = [make_env(rl.env) for _ in runs]
  try:
    flat = run_episodes(sampler, tokenizer, envs, [tasks[t] for t, _ in runs], sampling,
                        limits, seed=(seed * 1_000_003 + step) * len(runs),
                        monitors=[rft.monitor(tasks[t]) if rft is not None else None
                                  for t, _ in runs])
  finally:
    for env in envs:
      env.close()
  for (t, _), r in zip(runs, flat):
    if r.error:  # the runner records failures; here one stops the stage
      raise RuntimeError(f"task {tasks[t].get('id', t)!r}: episode failed: {r.error}")
    if r.num_turns == 0 and r.finish_reason == "max_tokens":
      raise ValueError(f"task {tasks[t].get('id', t)!r}: the prompt alone has "
                       f"{len(r.tokens)} tokens >= rl.max_tokens={rl.max_tokens}; "
                       f"raise rl.max_tokens (and rl.row_tokens)")
  groups, rewards, turns, calls, parallel, cut = [], [], [], [], [], 0
  for t, task in enumerate(tasks):
    rollouts = flat[t * rl.group_size:(t + 1) * rl.group_size]
    branches = [x.to_tree(group_id=t, policy_version=step) for x in rollouts]
    if rft is None:
      r = np.asarray([x.reward for x in rollouts], np.float64)
    else:
      r = rft.rewards(task, rollouts)
      teacher = rft.teacher(task)
      if teacher is not None:  # scored like a rollout: similarity 1, outcome 1
        branches.append(dataclasses.replace(teacher, group_id=t, policy_version=step))
        r = np.append(r, 1.0)
    adv = np.asarray(grpo_advantages(r, np.zeros(len(r), np.int32)), np.float64)
    groups.append([dataclasses.replace(b, reward=float(x), advantage=float(a))
                   for b, x, a in zip(branches, r, adv)])
    rewards += list(r[:len(rollouts)])
    turns += [x.num_turns for x in rollouts]
    calls += [x.num_tool_calls for x in rollouts]
    parallel += [x.parallel_turns for x in rollouts]
    cut += sum(x.finish_reason == "deviation" for x in rollouts)
  stats = {"reward_mean": float(np.mean(rewards)), "turns_mean": float(np.mean(turns)),
           "tool_calls_mean": float(np.mean(calls)),
           "parallel_call_turns": float(np.sum(parallel)) / max(float(np.sum(turns)), 1.0),
           "deviation_cut_share": cut / len(rewards)}
  return groups, stats


def train_rl(config, workdir: str, *, verbose: bool = True, rft=None) -> dict:
  """Run (or resume) the RL loop; returns {start_step, steps, reward_mean, loss, state}.

  Step-0 weights: config.init_from (a previous stage's workdir or a HF folder) or random;
  a workdir with its own checkpoint resumes from it. rft: see `collect_groups` (the RFT
  stage passes its ground-truth rewards).
  """
  run = parse(config)
  rl, tc = run.rl, run.train
  tokenizer = make_tokenizer(config, workdir)
  _check_batch(rl, make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor,
                             sequence=run.mesh.sequence))
  tasks = load_rl_tasks(rl)
  if len(tasks) < rl.tasks_per_step:
    raise ValueError(f"{len(tasks)} tasks, fewer than rl.tasks_per_step={rl.tasks_per_step}")
  if rl.mode == "async":
    if rft is not None:
      raise ValueError("config.rl.mode='async' runs --stage=rl only; RFT is synchronous")
    from katjax.stages.rl_flow import train_rl_async
    # The flow admits tasks in this order (cycled): the order the synchronous loop takes.
    return train_rl_async(config, workdir, list(task_order(tasks, rl)), tokenizer,
                          verbose=verbose)
  # Enough epochs for every step (finite: grain's iterator needs an index-sized length).
  epochs = -(-tc.steps * rl.tasks_per_step // len(tasks)) + 1
  ds = task_order(tasks, rl).repeat(epochs)
  it = iter(ds.batch(rl.tasks_per_step, batch_fn=list).to_iter_dataset())
  tr = Trainer.setup(config, workdir, it, tokenizer, verbose=verbose)
  loss_cfg = rl.policy_loss()  # rl.norm, once: the tree weights, the loss and pruning
  prune_cfg = PruneConfig(selector=rl.prune_selector, norm=loss_cfg.norm, seed=tc.seed)
  # Rows over data x fsdp, each row's tokens over `sequence` (context parallelism, if > 1).
  tree_sh = batch_sharding(tr.mesh, 2, length=True)
  step_fn = make_tree_step(tr.cfg, loss_cfg, tr.optimizer, state_shardings=tr.state_shardings,
                           batch_sharding=tree_sh, out_sharding=replicated(tr.mesh))
  # A row the devices cannot hold fails here; the checked executable is the one that runs.
  try:
    step_fn = fit_tree_step(tr, step_fn, tree_sh) or step_fn
  except ValueError:
    tr.close()
    raise
  state = tr.state
  sampler = Sampler(tr.cfg, state.params, max_len=rl.max_tokens, tokenizer=tokenizer)
  summary = {"start_step": tr.start, "reward_mean": {}, "loss": {}, "workdir": workdir}
  mfu = MfuMeter(tr.cfg, tc.peak_flops)  # katjax/train/mfu.py
  for step in range(tr.start, tc.steps):
    t0 = time.perf_counter()
    groups, stats = collect_groups(sampler, tokenizer, next(it), rl, step=step,
                                   seed=tc.seed, rft=rft)
    t1 = time.perf_counter()
    batch, info = prune_batch(groups, rl.num_rows, rl.row_tokens, prune_cfg,
                              norm=prune_cfg.norm)
    arrays = jax.device_put(batch.arrays(), tree_sh)
    state, metrics = step_fn(state, arrays)
    mfu.add(arrays)
    sampler.update_weights(state.params)
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    done = step + 1
    metrics.update(stats, flat_tokens=float(sum(len(t) for g in groups for t in g)),
                   kept_tokens=float(info["kept_tokens"]), tree_tokens=float(info["tokens"]),
                   retained_signal=float(info["retained_signal"]),
                   rollout_s=t1 - t0, train_s=t2 - t1, bubble=(t1 - t0) / (t2 - t0),
                   **mfu.take(t2 - t1))
    summary["reward_mean"][done] = stats["reward_mean"]
    summary["loss"][done] = float(metrics["loss"])
    if tr.is_log_step(done):
      tr.log.write(done, metrics)
    tr.end_step(done, state, it)
  tr.close()
  summary.update(steps=tc.steps, state=state)
  return summary


def _check_batch(rl: RLConfig, mesh) -> None:
  """Fail early, naming the fields, on a tree batch the mesh or a trajectory cannot fit."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if rl.num_rows % shards:
    raise ValueError(f"rl.num_rows={rl.num_rows} cannot be split over the {shards} data x "
                     f"fsdp devices of mesh {dict(mesh.shape)}")
  if rl.row_tokens % mesh.shape["sequence"]:
    raise ValueError(f"rl.row_tokens={rl.row_tokens} is not divisible by "
                     f"mesh.sequence={mesh.shape['sequence']}: each tree row's tokens are "
                     f"split evenly over the sequence devices")
  if rl.max_tokens > rl.row_tokens:
    raise ValueError(f"rl.max_tokens={rl.max_tokens} > rl.row_tokens={rl.row_tokens}: a "
                     f"whole trajectory must fit one row of the tree batch")
