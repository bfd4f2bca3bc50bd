"""Multi-turn agent loop over an `Environment`, recorded at token level for the prefix tree.

The loop keeps the conversation as the exact token sequence the model saw: the first prompt
is `tokenizer.encode_chat(messages, tools, add_generation_prompt=True)`; every generated
token is appended verbatim (never re-tokenized); tool results and the next assistant header
are appended as the chat template renders them after the model's closing `<|im_end|>`.
So `tokens[:turn_starts[k]]` is exactly the prompt of turn k, and `loss_mask` is 1 exactly
on generated tokens.

Per turn: generate, parse `<tool_call>` blocks (several per turn), run them with
`env.step` (concurrently, in the environment's thread pool), append the results, repeat
until the model answers without a tool call, the environment is done (submit), or a limit
(turns, tokens, wall time) is hit. Malformed calls become error observations and are counted.

`backend` is anything with `generate(prompts, sampling, n=, seed=, cancelled=)` returning
`Completion`s: the local `Sampler`, or `OpenAIClient` for an external server.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np

from katjax.core import tree
from katjax.envs.base import ToolCall
from katjax.rollout.deviation import truncate_after
from katjax.model.tokenizer import IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from katjax.rollout.sampler import SamplingParams

__all__ = ["AgentLimits", "Rollout", "run_episode", "EVENT_TOOL_CALL", "EVENT_TOOL_RESULT",
           "EVENT_TOOL_ERROR"]

# Event flags per token (bit mask; the same bits as `katjax.core.tree` flags).
EVENT_TOOL_CALL = tree.TOOL_CALL  # generated tokens of a <tool_call> block
EVENT_TOOL_RESULT = tree.TOOL_RESULT  # template tokens carrying tool results to the model
EVENT_TOOL_ERROR = 8  # a tool result (or call) that was an error


@dataclasses.dataclass(frozen=True)
class AgentLimits:
  """Episode limits: turns, total tokens (prompt included), new tokens per turn, seconds."""

  max_turns: int = 8
  max_tokens: int = 4096
  max_new_tokens: int = 512
  max_seconds: float = 600.0

  def __post_init__(self):
    for name in ("max_turns", "max_tokens", "max_new_tokens"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"AgentLimits.{name} must be an int >= 1, got {getattr(self, name)!r}")
    if not self.max_seconds > 0:
      raise ValueError(f"AgentLimits.max_seconds must be > 0, got {self.max_seconds!r}")


@dataclasses.dataclass
class Rollout:
  """One trajectory. Arrays are [T] (T = all tokens); turn_* are [K] (K = model turns).

  tokens int32, loss_mask int32 (1 on generated tokens), logprobs / raw_logprobs / entropies
  float32 (0 off generated tokens), events int32 (EVENT_* bits); the k-th model turn
  generated tokens[turn_starts[k]:turn_ends[k]].
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  logprobs: np.ndarray
  raw_logprobs: np.ndarray
  entropies: np.ndarray
  events: np.ndarray
  turn_starts: np.ndarray
  turn_ends: np.ndarray
  messages: list
  reward: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)
  finish_reason: str = ""  # answer|submitted|max_turns|max_tokens|length|timeout|deviation
  num_tool_calls: int = 0
  num_tool_errors: int = 0
  parallel_turns: int = 0  # turns with more than one tool call

  @property
  def num_turns(self) -> int:
    return len(self.turn_starts)

  def to_tree(self, group_id: int = 0, policy_version: int = 0) -> tree.Trajectory:
    """The record as a `katjax.core.tree.Trajectory` (input of `build_tree`)."""
    return tree.Trajectory(tokens=self.tokens, loss_mask=self.loss_mask,
                           logprobs=self.logprobs, entropy=self.entropies, flags=self.events,
                           reward=self.reward, group_id=group_id,
                           policy_version=policy_version)


def run_episode(backend, tokenizer, env, task: dict, sampling: SamplingParams | None = None,
                limits: AgentLimits = AgentLimits(), seed: int = 0, monitor=None) -> Rollout:
  """Runs one task to the end and returns its token-level `Rollout` (reward included).

  monitor: an RFT `katjax.rollout.deviation.DeviationMonitor`, called after every turn that
  does not end the episode; when it says stop the episode ends ("deviation") and the tokens
  of the deviating turns are masked out of the loss (kept in the record).
  """
  sampling = sampling or SamplingParams(max_new_tokens=limits.max_new_tokens)
  deadline = time.monotonic() + limits.max_seconds
  messages, tools = env.reset(task)
  messages = list(messages)
  rec = _Recorder()
  ids, _ = tokenizer.encode_chat(messages, tools, add_generation_prompt=True)
  rec.add(ids)
  call_ids = _single_ids(tokenizer, TOOL_CALL_OPEN), _single_ids(tokenizer, TOOL_CALL_CLOSE)
  finish, n_calls, n_errors, parallel = "max_turns", 0, 0, 0
  for turn in range(limits.max_turns):
    room = limits.max_tokens - len(rec.tokens)
    if room <= 0:
      finish = "max_tokens"
      break
    if time.monotonic() >= deadline:
      finish = "timeout"
      break
    sp = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens,
                                                          limits.max_new_tokens, room))
    comp = backend.generate([np.asarray(rec.tokens, np.int32)], sp, seed=seed * 1000 + turn,
                            cancelled=lambda _: time.monotonic() >= deadline)[0][0]
    gen = np.asarray(comp.tokens, np.int32)
    rec.turn_starts.append(len(rec.tokens))
    rec.add(gen, mask=1, logprobs=comp.logprobs, raw=comp.raw_logprobs, ent=comp.entropy,
            events=_call_events(gen, *call_ids))
    rec.turn_ends.append(len(rec.tokens))
    text = tokenizer.decode(gen)
    content, calls, errors = tokenizer.parse_tool_calls(text)
    if (calls or errors) and call_ids[0] is None:  # no single-token tag: flag the whole turn
      rec.events[rec.turn_starts[-1]:] = [e | EVENT_TOOL_CALL for e in rec.events[
          rec.turn_starts[-1]:]]
    tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=c["name"],
                           arguments=c["arguments"]) for c in calls]
    messages.append(_assistant_message(content, tool_calls))
    if comp.finish_reason == "cancelled":
      finish = "timeout"
      break
    if comp.finish_reason != "stop":  # cut by max_new_tokens: the turn never closed
      finish = "max_tokens" if sp.max_new_tokens == room else "length"
      break
    if not calls and not errors:
      finish = "answer"
      break
    observations, done = env.step(tool_calls) if tool_calls else ([], env.done)
    n_calls += len(tool_calls) + len(errors)
    parallel += len(tool_calls) + len(errors) > 1
    results = [(c.id, obs) for c, obs in zip(tool_calls, observations)]
    results += [("", f"Error: {err}") for err in errors]
    n_errors += sum(obs.startswith("Error") for _, obs in results)
    before = len(messages)
    messages += [{"role": "tool", "tool_call_id": cid, "content": obs} for cid, obs in results]
    delta = _template_delta(tokenizer, messages, before, tools)
    flag = EVENT_TOOL_RESULT | (EVENT_TOOL_ERROR if any(o.startswith("Error")
                                                        for _, o in results) else 0)
    rec.add(tokenizer.encode(delta), events=flag)
    if monitor is not None:
      generated = np.asarray(rec.tokens, np.int32)[np.asarray(rec.mask, bool)]
      if monitor(tool_calls, generated=generated, malformed=len(errors)).stop:
        finish = "deviation"
        break
    if done:
      finish = "submitted"
      break
  reward, info = env.evaluate()
  rollout = rec.finish(messages, float(reward), info, finish, n_calls, n_errors, parallel)
  if monitor is not None and monitor.verdict.stop:
    rollout = truncate_after(rollout, int(rollout.turn_starts[monitor.verdict.cut_turn]))
    rollout.info["deviation"] = monitor.verdict.reason
  return rollout


# --- helpers -----------------------------------------------------------------------------------


class _Recorder:
  def __init__(self):
    self.tokens, self.mask, self.logp, self.raw, self.ent, self.events = [], [], [], [], [], []
    self.turn_starts, self.turn_ends = [], []

  def add(self, ids, mask=0, logprobs=None, raw=None, ent=None, events=0):
    n = len(ids)
    zeros = np.zeros(n, np.float32)
    self.tokens += [int(i) for i in ids]
    self.mask += [mask] * n
    self.logp += list(np.asarray(logprobs if logprobs is not None else zeros, np.float32))
    self.raw += list(np.asarray(raw if raw is not None else zeros, np.float32))
    self.ent += list(np.asarray(ent if ent is not None else zeros, np.float32))
    self.events += list(np.broadcast_to(np.asarray(events, np.int32), (n,)))

  def finish(self, messages, reward, info, finish, n_calls, n_errors, parallel):
    arr = lambda x, dt: np.asarray(x, dt).reshape(-1)
    return Rollout(tokens=arr(self.tokens, np.int32), loss_mask=arr(self.mask, np.int32),
                   logprobs=arr(self.logp, np.float32), raw_logprobs=arr(self.raw, np.float32),
                   entropies=arr(self.ent, np.float32), events=arr(self.events, np.int32),
                   turn_starts=arr(self.turn_starts, np.int32),
                   turn_ends=arr(self.turn_ends, np.int32), messages=messages, reward=reward,
                   info=info, finish_reason=finish, num_tool_calls=n_calls,
                   num_tool_errors=n_errors, parallel_turns=parallel)


def _assistant_message(content, tool_calls):
  import json

  msg = {"role": "assistant", "content": content}
  if tool_calls:
    msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
        "name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
                         for c in tool_calls]
  return msg


def _template_delta(tokenizer, messages, n_before, tools) -> str:
  """Text the template puts after the last assistant's `<|im_end|>`: tool results + header."""
  prefix = tokenizer.render_chat(messages[:n_before], tools)
  full = tokenizer.render_chat(messages, tools, add_generation_prompt=True)
  cut = prefix.rfind(IM_END) + len(IM_END)
  if cut < len(IM_END) or full[:cut] != prefix[:cut]:
    raise ValueError("chat template is not prefix-stable: cannot append tool results "
                     "at token level")
  return full[cut:]


def _single_ids(tokenizer, text):
  ids = tokenizer.encode(text)
  return ids[0] if len(ids) == 1 else None


def _call_events(gen, open_id, close_id):
  """EVENT_TOOL_CALL on tokens from each `<tool_call>` through its `</tool_call>`."""
  events = np.zeros(len(gen), np.int32)
  if open_id is None or close_id is None:
    return events
  inside = False
  for i, t in enumerate(gen):
    inside = inside or t == open_id
    if inside:
      events[i] = EVENT_TOOL_CALL
    if t == close_id:
      inside = False
  return events
