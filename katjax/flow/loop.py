"""SeamlessFlow's loop: agents, trajectory manager, engine and trainer run decoupled.

Three parties, one process:
- a feeder thread admits task groups while the staleness bound allows (the manager's AReaL
  rule) and submits each episode to the scheduler as a "rollout" task;
- episodes (`episode_fn(task, backend, seed) -> (reward, info)`: the agent loop with an
  environment) talk to the inference engine through a `RecordingBackend`, so the manager
  records every token exactly with the policy version that produced it;
- the trainer takes a batch of finished groups as soon as one is ready, runs one step as a
  "train" task and publishes the weights to the engine, which applies them between decode
  chunks: episodes in flight continue on the new weights (partial rollouts), their earlier
  tokens keep their old version.

`mode="sync"` is the synchronous schedule for comparison: eta = 0 (one batch per version,
nothing runs ahead) so rollouts wait for the update and the trainer waits for the slowest
episode of each batch. `mode="async"` admits up to eta versions ahead.

Where tasks run: `scheduler` builds the tag scheduler over `flow_resources(cfg)` ("agents":
tag rollout, `rollout_slots` slots; "trainer": tag train): in-process threads by default,
or Ray (`RayScheduler` with the trainer local: episodes run on Ray workers, anywhere in the
cluster). `connect(session)` gives an episode its engine backend where it runs: by default
a `RecordingBackend` over the in-process engine; on Ray an `OpenAIClient` of the trajectory
manager's OpenAI proxy (`katjax.flow.proxy`), which records the same ids and versions on the
driver. Either way an episode returns (reward, info) and the driver grades it into the
manager when its task completes.

Failures: an episode that raises is aborted in the manager (its group dropped, counted) and
its task queued again; a train step that raises is retried on the same groups (the flow
state is untouched) up to `train_retries` times.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import zlib

import numpy as np

from katjax.flow.scheduler import Resource, ThreadScheduler
from katjax.flow.trajectories import RecordingBackend, TrajectoryManager
from katjax.rollout.batch import episode_seed

MODES = ("sync", "async")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  mode: str = "async"
  eta: int = 1  # async staleness bound (versions ahead); sync uses 0
  group_size: int = 4
  groups_per_step: int = 2
  steps: int = 4
  rollout_slots: int = 8  # episodes running at once
  train_retries: int = 2
  max_failed_episodes: int = 32  # more failures in a row end the run (a broken engine/env)
  seed: int = 0  # the run's seed: varies every episode's sampling seed (0: as before it existed)

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"flow mode must be one of {MODES}, got {self.mode!r}")
    if self.eta < 0:
      raise ValueError(f"flow eta (staleness bound) must be >= 0, got {self.eta}")
    for name in ("group_size", "groups_per_step", "steps", "rollout_slots",
                 "max_failed_episodes"):
      if getattr(self, name) < 1:
        raise ValueError(f"flow {name} must be >= 1, got {getattr(self, name)}")

  @property
  def effective_eta(self) -> int:
    return 0 if self.mode == "sync" else self.eta


def flow_resources(cfg: FlowConfig) -> list[Resource]:
  """The resources run_flow schedules on: the agents' rollout slots and the trainer."""
  return [Resource("agents", {"rollout"}, slots=cfg.rollout_slots),
          Resource("trainer", {"train"})]


def run_flow(cfg: FlowConfig, *, engine, tasks, episode_fn, learner, manager=None,
             feeder=None, start_step: int = 0, on_step=None, scheduler=ThreadScheduler,
             connect=None) -> dict:
  """Runs cfg.steps train steps; returns throughput, bubble, idle and staleness figures.

  engine: `Engine`-like (thread-safe `generate`, `update_weights`, `version`, `snapshot`);
  tasks: a list cycled in order; learner: `train(groups) -> (params, metrics)`;
  on_step(step, metrics, state): called after each published update with the flow's
  state at that point ({"manager", "feeder"}, what `resume_state` loads), e.g. to checkpoint it
  with the train state. manager / feeder / start_step: a restored run's state.
  scheduler: resources -> a started tag scheduler (ThreadScheduler, or e.g.
  `functools.partial(RayScheduler, local=("trainer",))`); connect: session -> the episode's
  engine backend, built where the episode runs (picklable for Ray); default records into
  `manager` in-process.
  """
  manager = manager or TrajectoryManager(cfg.group_size, cfg.groups_per_step,
                                         eta=cfg.effective_eta)
  sched = scheduler(flow_resources(cfg))
  connect = connect or functools.partial(RecordingBackend, engine, manager)
  state = feeder or TaskFeeder(tasks)
  stop = threading.Event()
  wake = threading.Condition()
  counters = collections.Counter()
  # Held while the task order and the manager change together (a group admitted, a dead
  # episode's task requeued), so a snapshot never has one without the other.
  admit = threading.Lock()
  failures = []  # the errors of the current run of consecutive failed episodes

  def graded(session, future):
    """The episode's task completed (on a worker thread or the Ray waiter): grade it."""
    if future.cancelled():  # queued when the run ended: never started
      return
    try:
      reward, info = future.result()
      manager.finish(session, reward, info)
      failures.clear()
    except BaseException as e:  # noqa: BLE001 - a dead agent is counted and its task rescheduled
      counters["failed_episodes"] += 1
      failures.append(e)
      with admit:
        if session in manager.sessions:
          state.requeue(manager.abort(session))
    with wake:
      wake.notify_all()

  def check_failures():
    if len(failures) >= cfg.max_failed_episodes:
      raise RuntimeError(f"run_flow: {len(failures)} episodes failed in a row (last: "
                         f"{failures[-1]!r})") from failures[-1]

  def feeder():
    while not stop.is_set():
      with wake:
        while not stop.is_set() and not manager.can_admit(cfg.group_size):
          wake.wait(0.05)
      if stop.is_set() or len(failures) >= cfg.max_failed_episodes:
        return
      with admit:
        task, key = state.next()
        sessions = [f"{key}/{g}" for g in range(cfg.group_size)]
        manager.start_group(key, sessions)
      for s in sessions:
        future = sched.submit("rollout", play_episode, episode_fn, connect, task, s,
                              session_seed(s, cfg.seed))
        future.add_done_callback(functools.partial(graded, s))

  t0 = time.monotonic()
  thread = threading.Thread(target=feeder, daemon=True, name="katjax-flow-feeder")
  thread.start()
  waited, trained_s, steps, staleness, n_traj, n_tokens = 0.0, 0.0, [], [], 0, 0
  try:
    for step in range(start_step, cfg.steps):
      w0 = time.monotonic()
      taken = manager.take_batch()
      while taken is None:
        check_failures()
        with wake:
          wake.wait(0.02)
        taken = manager.take_batch()
      groups, info = taken
      waited += time.monotonic() - w0
      s0 = time.monotonic()
      params, metrics = _train_with_retries(sched, learner, groups, cfg.train_retries,
                                            counters)
      engine.update_weights(params)
      manager.set_version(step + 1)  # the engine's weights: one version per step
      with wake:
        wake.notify_all()
      trained_s += time.monotonic() - s0
      staleness.append(info["staleness"])
      n_traj += sum(len(g) for g in groups)
      n_tokens += int(sum(t.loss_mask.sum() for g in groups for t in g))
      metrics.update(info, reward_mean=float(np.mean([t.reward for g in groups for t in g])))
      steps.append(metrics)
      if on_step is not None:
        with admit:
          snapshot = {"manager": manager.state_dict(), "feeder": state.get_state()}
        on_step(step + 1, metrics, snapshot)
  finally:
    stop.set()
    with wake:
      wake.notify_all()
    thread.join()
    wall = time.monotonic() - t0
    usage = sched.usage()
    sched.shutdown()
  snap = engine.snapshot() if hasattr(engine, "snapshot") else {}
  return {"mode": cfg.mode, "eta": cfg.effective_eta, "steps": len(steps), "wall_s": wall,
          "trajectories": n_traj, "tasks": usage["tasks"],
          "trajectories_per_s": n_traj / wall, "tokens_per_s": n_tokens / wall,
          "trainer_bubble": waited / wall,
          "rollout_idle": 1.0 - usage["busy"]["agents"]["rollout"] / cfg.rollout_slots,
          "mean_staleness": float(np.mean(staleness)) if staleness else 0.0,
          "prefix_cache_hit_rate": float(snap.get("prefix_hit_rate", 0.0)),
          "failed_episodes": counters["failed_episodes"],
          "train_retries": counters["train_retries"], "manager": dict(manager.stats),
          "train_s": trained_s, "history": steps}


def session_seed(session: str, seed: int = 0) -> int:
  """An episode's sampling seed: `rollout.batch.episode_seed` of the run's seed, with the
  session id's crc32 as the episode index (so a resumed run samples a rerun task like the
  first; below 2e6, which the agent and an OpenAI server need)."""
  return episode_seed(seed, zlib.crc32(session.encode()))


def play_episode(episode_fn, connect, task, session: str, seed: int):
  """A rollout task, wherever it runs: episode_fn(task, connect(session), seed) -> (reward,
  info)."""
  reward, info = episode_fn(task, connect(session), seed)
  return float(reward), dict(info or {})


class TaskFeeder:
  """Tasks in order, cycled; rescheduled tasks first. A group's key is "<task index>#<n>".

  `get_state` / `set_state` (plain JSON) let a checkpoint resume the same order.
  """

  def __init__(self, tasks):
    if not tasks:
      raise ValueError("run_flow: no tasks")
    self._tasks = list(tasks)
    self._next = 0  # groups handed out (the n of each key: keys are never reused)
    self._fresh = 0  # position in the cycle (a rerun does not take a fresh task's turn)
    self._again: collections.deque = collections.deque()
    self._lock = threading.Lock()

  def next(self):
    with self._lock:
      n, self._next = self._next, self._next + 1
      if self._again:
        index = int(self._again.popleft().split("#")[0])
      else:
        index, self._fresh = self._fresh % len(self._tasks), self._fresh + 1
      return self._tasks[index], f"{index}#{n}"

  def requeue(self, key: str) -> None:
    if not str(key).split("#")[0].isdigit():
      raise ValueError(f"TaskFeeder.requeue: {key!r} is not a group key '<task index>#<n>'")
    with self._lock:
      self._again.append(key)

  def get_state(self) -> dict:
    with self._lock:
      return {"next": self._next, "fresh": self._fresh, "again": list(self._again)}

  def set_state(self, state: dict) -> None:
    with self._lock:
      self._next, self._again = int(state["next"]), collections.deque(state["again"])
      self._fresh = int(state.get("fresh", self._next))  # checkpoints from before "fresh"


def resume_state(manager: TrajectoryManager, feeder: TaskFeeder, state: dict) -> int:
  """Load a checkpointed {"manager", "feeder"} state; returns the number of episodes that
  were running at the checkpoint. Their groups are dropped and their tasks queued again
  (their agents are gone); finished, untrained groups stay ready, so after a kill and a
  resume every finished trajectory is trained once and none twice."""
  manager.load_state_dict(state["manager"])
  feeder.set_state(state["feeder"])
  running = [s for s, sess in manager.sessions.items() if sess.reward is None]
  dropped = 0
  for s in running:
    if s in manager.sessions:  # a sibling's abort may have dropped it already
      task = manager.abort(s)
      if task:  # "" for a session no feeder admitted: nothing to run again
        feeder.requeue(task)
      dropped += 1
  manager.stats["aborted"] -= dropped  # a restart, not a dead agent
  manager.stats["resumed_groups_requeued"] = manager.stats.get("resumed_groups_requeued", 0) + dropped
  return len(running)


def _train_with_retries(sched, learner, groups, retries, counters):
  for attempt in range(retries + 1):
    try:
      return sched.submit("train", learner.train, groups).result()
    except Exception:  # noqa: BLE001
      if attempt == retries:
        raise
      counters["train_retries"] += 1
  raise AssertionError("unreachable")
