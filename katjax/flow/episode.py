"""run_flow's episode for agentic RL: the agent loop on one task, as a picklable callable.

Ray workers unpickle it by reference, so this module imports only what an episode needs
(the agent loop and the environments), not the trainer.
"""

from __future__ import annotations

from katjax.envs.base import make_env
from katjax.rollout.agent import AgentLimits, run_episode
from katjax.rollout.sampler import SamplingParams


class AgentEpisode:
  """episode_fn(task, backend, seed) -> (reward, info): `run_episode` on a fresh `env`."""

  def __init__(self, tokenizer, env: str, sampling: SamplingParams, limits: AgentLimits):
    self.tokenizer, self.env, self.sampling, self.limits = tokenizer, env, sampling, limits

  def __call__(self, task, backend, seed):
    ro = run_episode(backend, self.tokenizer, make_env(self.env), task, self.sampling,
                     self.limits, seed=seed)
    if ro.error:  # counted and rescheduled by run_flow; many in a row stop the run
      raise RuntimeError(f"episode failed: {ro.error}")
    return ro.reward, {"turns": ro.num_turns, "tool_calls": ro.num_tool_calls}
