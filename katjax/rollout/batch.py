"""Many agent episodes in lock-step: one `generate` call serves every active episode's turn.

`run_episodes(backend, tokenizer, envs, tasks, ...)` runs the one episode runner,
`katjax.rollout.agent.run_episode`, for every task at once, each in its own thread, against
a shared `_Lockstep` backend. A thread's `generate` (one prompt: its episode's next turn)
waits until every episode still running has asked for its turn too; then the real backend
gets all those prompts in one batched call and each thread continues with its completion
(parse, run tools, append results). So the records are exactly `run_episode`'s, while a
turn of 200 episodes costs one batched decode instead of 200 sequential ones. Evaluation and
RL collect rollouts through it.

Randomness: episode i runs `run_episode(..., seed=episode_seed(seed, i))`, and a request with
seed s is sampled with the key the backend would use for a single prompt with that seed
(`fold_in(PRNGKey(s), 0)`); the sampler's rows are independent, so an episode's record does
not depend on which other episodes share the batch.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from katjax.rollout import agent
from katjax.rollout.agent import AgentLimits, Rollout

__all__ = ["run_episodes", "episode_seed"]


def run_episodes(backend, tokenizer, envs, tasks, sampling=None,
                 limits: AgentLimits = AgentLimits(), seed: int = 0, monitors=None,
                 on_turn=None) -> list[Rollout]:
  """Runs tasks[i] in envs[i] for every i, all at once; returns one Rollout per task.

  monitors: None or one RFT DeviationMonitor (or None) per task, as in `run_episode`.
  on_turn: optional callback(n_prompts) after each batched generate call (progress bars).
  An exception in any episode is raised here once all threads have stopped.
  """
  if len(envs) != len(tasks):
    raise ValueError(f"run_episodes: {len(envs)} envs for {len(tasks)} tasks")
  monitors = monitors if monitors is not None else [None] * len(tasks)
  shared = _Lockstep(backend, len(tasks), on_turn)
  out, errors = [None] * len(tasks), []

  def play(i):
    try:
      out[i] = agent.run_episode(shared, tokenizer, envs[i], tasks[i], sampling, limits,
                                 seed=episode_seed(seed, i), monitor=monitors[i])
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      errors.append(e)
    finally:
      shared.leave()

  threads = [threading.Thread(target=play, args=(i,), daemon=True) for i in range(len(tasks))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return out


def episode_seed(seed: int, i: int) -> int:
  """The run_episode seed of episode i (kept below 2**31 / 1000: run_episode adds turns)."""
  return (int(seed) * 1_000_003 + int(i)) % 2_000_000


class _Lockstep:
  """A backend shim: gathers one request per live episode, then makes one batched call."""

  def __init__(self, backend, n: int, on_turn=None):
    self.backend, self.live, self.on_turn = backend, n, on_turn
    self.cv = threading.Condition()
    self.pending, self.results = [], {}

  def generate(self, prompts, sampling=None, *, n: int = 1, seed: int = 0, cancelled=None):
    if len(prompts) != 1 or n != 1:
      raise ValueError("run_episodes: an episode asks for one continuation of one prompt")
    ticket = object()
    with self.cv:
      self.pending.append((ticket, prompts[0], sampling, seed, cancelled))
      self._dispatch_if_ready()
      while ticket not in self.results:
        self.cv.wait()
      result = self.results.pop(ticket)
    if isinstance(result, BaseException):
      raise result
    return [result]

  def leave(self) -> None:
    """An episode ended: the others no longer wait for it."""
    with self.cv:
      self.live -= 1
      self._dispatch_if_ready()

  def _dispatch_if_ready(self):
    # Called with the lock held; every live episode is waiting, so the batch is complete.
    if not self.pending or len(self.pending) < self.live:
      return
    batch, self.pending = self.pending, []
    keys = _request_keys([s for _, _, _, s, _ in batch])
    cancels = [c for _, _, _, _, c in batch]
    try:
      comps = self.backend.generate(
          [p for _, p, _, _, _ in batch], [sp for _, _, sp, _, _ in batch], keys=keys,
          cancelled=lambda i: cancels[i] is not None and cancels[i](0))
      for (ticket, *_), c in zip(batch, comps):
        self.results[ticket] = c
    except BaseException as e:  # noqa: BLE001 - every waiting episode sees the failure
      for ticket, *_ in batch:
        self.results[ticket] = e
    if self.on_turn is not None:
      self.on_turn(len(batch))
    self.cv.notify_all()


def _request_keys(seeds) -> np.ndarray:
  """uint32[N, 2]: the key a one-prompt `generate(seed=s)` call gives its only row."""
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 0))(
      jnp.asarray(np.asarray(seeds, np.int32)))
  return np.asarray(jax.device_get(keys), np.uint32)
