"""Many agent episodes in lock-step: one `generate` call serves every active episode's turn.

`run_episodes(backend, tokenizer, envs, tasks, ...)` is `katjax.rollout.agent.run_episode`
for a batch: each round gathers the token sequence of every episode still running, asks
the backend for all their next turns in one call (the sampler batches them; rows finish
independently), then parses, runs the tool calls and appends the results per episode with
the agent loop's own helpers, so a record is token for token what `run_episode` would
record for the same completions. Evaluation and RL collect rollouts through it: a turn of
200 episodes costs one batched decode instead of 200 sequential ones.

Randomness is per episode and turn: episode i's turn k samples with key
`fold_in(fold_in(PRNGKey(seed), i), k)`, and the sampler's rows are independent, so an
episode's record does not depend on which other episodes share the batch.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from katjax.envs.base import ToolCall
from katjax.model.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from katjax.rollout import agent
from katjax.rollout.agent import AgentLimits, Rollout
from katjax.rollout.deviation import truncate_after
from katjax.rollout.sampler import SamplingParams

__all__ = ["run_episodes", "episode_keys"]


def run_episodes(backend, tokenizer, envs, tasks, sampling: SamplingParams | None = None,
                 limits: AgentLimits = AgentLimits(), seed: int = 0, monitors=None,
                 on_turn=None) -> list[Rollout]:
  """Runs tasks[i] in envs[i] for every i, all at once; returns one Rollout per task.

  monitors: None or one RFT DeviationMonitor (or None) per task, as in `run_episode`.
  on_turn: optional callback(n_active) after each batched turn (progress bars).
  The caller owns the environments (and closes them).
  """
  if len(envs) != len(tasks):
    raise ValueError(f"run_episodes: {len(envs)} envs for {len(tasks)} tasks")
  sampling = sampling or SamplingParams(max_new_tokens=limits.max_new_tokens)
  monitors = monitors if monitors is not None else [None] * len(tasks)
  deadline = time.monotonic() + limits.max_seconds
  call_ids = agent._single_ids(tokenizer, TOOL_CALL_OPEN), agent._single_ids(
      tokenizer, TOOL_CALL_CLOSE)
  eps = [_Episode(tokenizer, env, task, mon, call_ids)
         for env, task, mon in zip(envs, tasks, monitors)]
  for turn in range(limits.max_turns):
    active = []
    for i, ep in enumerate(eps):
      if ep.finish:
        continue
      room = limits.max_tokens - len(ep.rec.tokens)
      if room <= 0:
        ep.finish = "max_tokens"
      elif time.monotonic() >= deadline:
        ep.finish = "timeout"
      else:
        active.append((i, dataclasses.replace(sampling, max_new_tokens=min(
            sampling.max_new_tokens, limits.max_new_tokens, room)), room))
    if not active:
      break
    keys = episode_keys(seed, [i for i, _, _ in active], turn)
    comps = backend.generate([np.asarray(eps[i].rec.tokens, np.int32) for i, _, _ in active],
                             [sp for _, sp, _ in active], keys=keys,
                             cancelled=lambda _: time.monotonic() >= deadline)
    for (i, sp, room), comp in zip(active, comps):
      eps[i].advance(comp[0], sp, room)
    if on_turn is not None:
      on_turn(len(active))
  return [ep.result() for ep in eps]


def episode_keys(seed: int, episodes, turn: int) -> np.ndarray:
  """uint32[N, 2]: the sampling key of each episode's `turn`."""
  base = jax.random.PRNGKey(seed)
  ids = jnp.asarray(np.asarray(episodes, np.int32))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), turn))(ids)
  return np.asarray(jax.device_get(keys), np.uint32)


class _Episode:
  """One running episode: the agent loop's per-turn body, driven from outside."""

  def __init__(self, tokenizer, env, task, monitor, call_ids):
    self.tok, self.env, self.monitor, self.call_ids = tokenizer, env, monitor, call_ids
    messages, self.tools = env.reset(task)
    self.messages = list(messages)
    self.rec = agent._Recorder()
    ids, _ = tokenizer.encode_chat(self.messages, self.tools, add_generation_prompt=True)
    self.rec.add(ids)
    self.finish = ""
    self.n_calls = self.n_errors = self.parallel = 0

  def advance(self, comp, sp, room) -> None:
    """Appends one generated turn, runs its tool calls, sets `finish` when the episode ends."""
    rec, tok = self.rec, self.tok
    gen = np.asarray(comp.tokens, np.int32)
    rec.turn_starts.append(len(rec.tokens))
    rec.add(gen, mask=1, logprobs=comp.logprobs, raw=comp.raw_logprobs, ent=comp.entropies,
            events=agent._call_events(gen, *self.call_ids))
    rec.turn_ends.append(len(rec.tokens))
    content, calls, errors = tok.parse_tool_calls(tok.decode(gen))
    if (calls or errors) and self.call_ids[0] is None:
      rec.events[rec.turn_starts[-1]:] = [e | agent.EVENT_TOOL_CALL
                                          for e in rec.events[rec.turn_starts[-1]:]]
    tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=c["name"],
                           arguments=c["arguments"]) for c in calls]
    self.messages.append(agent._assistant_message(content, tool_calls))
    if comp.finish_reason == "cancelled":
      self.finish = "timeout"
      return
    if comp.finish_reason != "stop":
      self.finish = "max_tokens" if sp.max_new_tokens == room else "length"
      return
    if not calls and not errors:
      self.finish = "answer"
      return
    observations, done = (self.env.step(tool_calls) if tool_calls
                          else ([], self.env.done))
    self.n_calls += len(tool_calls) + len(errors)
    self.parallel += len(tool_calls) + len(errors) > 1
    results = [(c.id, obs) for c, obs in zip(tool_calls, observations)]
    results += [("", f"Error: {err}") for err in errors]
    self.n_errors += sum(obs.startswith("Error") for _, obs in results)
    before = len(self.messages)
    self.messages += [{"role": "tool", "tool_call_id": cid, "content": obs}
                      for cid, obs in results]
    delta = agent._template_delta(tok, self.messages, before, self.tools)
    flag = agent.EVENT_TOOL_RESULT | (agent.EVENT_TOOL_ERROR if any(
        o.startswith("Error") for _, o in results) else 0)
    rec.add(tok.encode(delta), events=flag)
    if self.monitor is not None:
      generated = np.asarray(rec.tokens, np.int32)[np.asarray(rec.mask, bool)]
      if self.monitor(tool_calls, generated=generated, malformed=len(errors)).stop:
        self.finish = "deviation"
        return
    if done:
      self.finish = "submitted"

  def result(self) -> Rollout:
    reward, info = self.env.evaluate()
    rollout = self.rec.finish(self.messages, float(reward), info, self.finish or "max_turns",
                              self.n_calls, self.n_errors, self.parallel)
    if self.monitor is not None and self.monitor.verdict.stop:
      rollout = truncate_after(rollout, int(rollout.turn_starts[self.monitor.verdict.cut_turn]))
      rollout.info["deviation"] = self.monitor.verdict.reason
    return rollout
