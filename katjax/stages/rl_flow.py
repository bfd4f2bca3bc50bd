"""Stage 4, asynchronous form (`--config.rl.mode=async`): agentic RL through SeamlessFlow.

The same task list, agent loop, tree batch and Trainer as the synchronous loop
(`stages/rl.py`), scheduled by `katjax.flow.loop.run_flow`: `rl.rollout_slots` episodes run
at once on the continuous-batching `Engine` and record into a `TrajectoryManager`; the
trainer steps as soon as `rl.tasks_per_step` groups are graded, and the engine takes the new
weights between decode chunks, so episodes in flight continue on them (partial rollouts).
Rollouts run at most `rl.eta` policy versions ahead (eta = 0: the synchronous schedule).

`rl.scheduler="ray"` runs the same job through `RayScheduler`: episodes are Ray tasks that
hold the custom resource `katjax_agents` (on a local instance, or on the cluster nodes that
declare it) and reach the engine through the trajectory manager's OpenAI proxy
(`katjax.flow.proxy`), which records their exact ids and versions here; train steps stay in
this process (the trainer's devices and state are the driver's). The asynchronous trainer is
one JAX process (several would each schedule their own episodes); on several hosts the
synchronous stage runs as one job over `jax.distributed`.

Checkpoints hold, beside the train state, the manager's state (finished but untrained groups,
version counters) and the task order. A resumed run (after a kill) trains the groups that
were finished at the checkpoint exactly once, and runs again the tasks whose episodes were
still going (their agents are gone).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from katjax.core.prune import PruneConfig
from katjax.flow.episode import AgentEpisode
from katjax.flow.learner import TreeLearner
from katjax.flow.loop import FlowConfig, TaskFeeder, flow_resources, resume_state, run_flow
from katjax.flow.scheduler import ThreadScheduler
from katjax.flow.trajectories import TrajectoryManager
from katjax.parallel import batch_sharding, replicated
from katjax.rollout.agent import AgentLimits
from katjax.rollout.engine import Engine
from katjax.rollout.sampler import Sampler, SamplingParams
from katjax.stages.common import fit_tree_step
from katjax.train.trainer import Trainer
from katjax.train.tree_step import make_tree_step


class FlowState:
  """The flow's part of a checkpoint (saved as the Trainer's data-iterator state): the
  snapshot `run_flow` takes right after a step, so it matches the saved train state."""

  def __init__(self, manager: TrajectoryManager, feeder: TaskFeeder):
    self.snapshot = {"manager": manager.state_dict(), "feeder": feeder.get_state()}

  def get_state(self) -> dict:
    return self.snapshot

  def set_state(self, state: dict) -> None:
    self.snapshot = state

  def start_prefetch(self) -> None:  # the data-iterator protocol of the checkpoint handler
    pass


def train_rl_async(config, workdir: str, tasks, tokenizer, *, verbose: bool = True) -> dict:
  """Run (or resume) asynchronous RL; returns {start_step, steps, reward_mean, loss, state,
  flow} like the synchronous `train_rl`, plus the flow's figures."""
  from katjax.train.config import parse

  run = parse(config)
  rl, tc = run.rl, run.train
  if jax.process_count() > 1:
    # Each host would schedule its own episodes by thread timing: different groups, tree
    # batches and step times on every host, mixed silently into one global batch.
    raise ValueError(
        f"config.rl.mode='async' trains in one JAX process, and this run has "
        f"{jax.process_count()}: on several hosts use rl.mode='sync' (every host collects the "
        f"same rollouts), or keep the async trainer in one process and spread its agents with "
        f"rl.scheduler='ray'")
  manager = TrajectoryManager(rl.group_size, rl.tasks_per_step, eta=rl.eta)
  feeder = TaskFeeder(tasks)
  flow_state = FlowState(manager, feeder)
  tr = Trainer.setup(config, workdir, flow_state, tokenizer, verbose=verbose)
  requeued = resume_state(manager, feeder, flow_state.snapshot) if tr.start else 0
  manager.set_version(tr.start)
  loss_cfg = rl.policy_loss()
  tree_sh = batch_sharding(tr.mesh, 2, length=True)  # tokens over `sequence`, if > 1
  step_fn = make_tree_step(tr.cfg, loss_cfg, tr.optimizer, state_shardings=tr.state_shardings,
                           batch_sharding=tree_sh, out_sharding=replicated(tr.mesh))
  # A row the devices cannot hold fails here (the learner keeps the jitted step: its
  # old_logp comes from another program, whose output sharding the executable would pin).
  try:
    fit_tree_step(tr, step_fn, tree_sh, extra=("old_logp",))
  except ValueError:
    tr.close()
    raise
  learner = TreeLearner(tr.cfg, tr.state, tr.optimizer, loss_cfg, num_rows=rl.num_rows,
                        row_tokens=rl.row_tokens, step_fn=step_fn, batch_sharding=tree_sh,
                        prune_cfg=PruneConfig(selector=rl.prune_selector, norm=loss_cfg.norm,
                                              seed=tc.seed))
  # The engine gets a copy: the train step donates the state's buffers.
  sampler = Sampler(tr.cfg, jax.tree.map(jnp.copy, tr.state.params), max_len=rl.max_tokens,
                    tokenizer=tokenizer)
  sampler.version = tr.start  # tokens carry the step whose weights made them, across resumes
  engine = Engine(sampler, rows=rl.rollout_slots)
  sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p,
                            max_new_tokens=rl.max_new_tokens)
  limits = AgentLimits(max_turns=rl.max_turns, max_tokens=rl.max_tokens,
                       max_new_tokens=rl.max_new_tokens)

  episode = AgentEpisode(tokenizer, rl.env, sampling, limits)
  summary = {"start_step": tr.start, "reward_mean": {}, "loss": {}, "workdir": workdir}

  def on_step(done, metrics, snapshot):
    summary["reward_mean"][done] = metrics["reward_mean"]
    summary["loss"][done] = metrics["loss"]
    flow_state.snapshot = snapshot
    if tr.is_log_step(done):
      tr.log.write(done, {k: v for k, v in metrics.items() if np.isscalar(v)})
    # Every step: the groups it trained (ids, content fingerprints, token versions), so a
    # run's log shows that a resume neither lost nor repeated data.
    tr.log.record(done, "flow", {"version": metrics["version"], "groups": metrics["lineage"]})
    tr.end_step(done, learner.state, flow_state)

  cfg = FlowConfig(mode="async", eta=rl.eta, group_size=rl.group_size,
                   groups_per_step=rl.tasks_per_step, steps=tc.steps,
                   rollout_slots=rl.rollout_slots, seed=tc.seed)
  placement = {"scheduler": ThreadScheduler}  # run_flow's defaults: threads, in-process engine
  closers = [engine.close, tr.close]
  try:
    if rl.scheduler == "ray":
      placement, close_ray = _ray_placement(rl, cfg, engine, tokenizer, manager)
      closers.insert(0, close_ray)
    out = run_flow(cfg, engine=engine, tasks=tasks, episode_fn=episode, learner=learner,
                   manager=manager, feeder=feeder, start_step=tr.start, on_step=on_step,
                   **placement)
  finally:
    for close in closers:
      close()
  out["scheduler"] = rl.scheduler
  out["requeued_at_resume"] = requeued
  summary.update(steps=tc.steps, state=learner.state,
                 flow={k: v for k, v in out.items() if k != "history"})
  return summary


def _ray_placement(rl, cfg: FlowConfig, engine, tokenizer, manager):
  """({scheduler, connect} for run_flow, close): Ray tasks for episodes, the trainer here.

  Joins `rl.ray_address` (a cluster whose rollout nodes declare `katjax_agents`, see README),
  or starts a local instance that declares it; episodes reach the engine through the
  recording OpenAI proxy, served on this node's address so workers elsewhere can reach it.
  """
  try:
    import ray
  except ImportError as e:
    raise ImportError("config.rl.scheduler='ray' needs the `ray` package (pip install "
                      "'katjax[test]' or 'ray>=2.40')") from e

  from katjax.flow.proxy import ProxyClient, serve_recorded
  from katjax.flow.scheduler import RayScheduler, ray_resources

  started = not ray.is_initialized()
  if started and rl.ray_address:
    ray.init(address=rl.ray_address)  # the cluster's nodes declare their resources
  elif started:
    agents = [r for r in flow_resources(cfg) if r.name == "agents"]
    ray.init(num_cpus=max(1, min(rl.rollout_slots, os.cpu_count() or 1)),
             resources=ray_resources(agents), include_dashboard=False, log_to_driver=False)
  server = serve_recorded(engine, tokenizer, manager, host=ray.util.get_node_ip_address())

  def close():
    server.httpd.shutdown()  # the engine is closed by the caller
    server.httpd.server_close()
    if started:
      ray.shutdown()

  return {"scheduler": functools.partial(RayScheduler, local=("trainer",)),
          "connect": ProxyClient(server.url)}, close
