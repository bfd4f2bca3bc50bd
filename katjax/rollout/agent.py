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

`backend` is anything with `generate(prompts, params, n=, seed=, cancelled=)` returning
`Completion`s: the local `Sampler`, or `OpenAIClient` for an external server.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np

from katjax.core import fields, tree
from katjax.core.fields import TOKEN_FIELDS, TOOL_CALL, TOOL_ERROR, TOOL_RESULT
from katjax.envs.base import ToolCall
from katjax.rollout.deviation import truncate_after
from katjax.model.tokenizer import IM_END, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from katjax.rollout.sampler import SamplingParams

__all__ = ["AgentLimits", "Rollout", "run_episode"]


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


@dataclasses.dataclass(kw_only=True)
@fields.token_attributes(optional=True)
class Rollout:
  """One trajectory. Per-token arrays are [T] (T = all tokens); turn_* are [K] (K = turns).

  One array per declared token field (`core.fields`): tokens int32, loss_mask (1 on
  generated tokens), logprobs / entropy float32 and version int32 (from the sampler on
  generated tokens, 0 elsewhere), flags int32 (fields.TOOL_CALL | TOOL_RESULT | TOOL_ERROR
  bits); plus raw_logprobs float32 (logprob under the raw model, before sampling filters).
  The k-th model turn generated tokens[turn_starts[k]:turn_ends[k]]. Missing per-token
  arrays are filled with the field's pad value.
  """

  raw_logprobs: np.ndarray | None = None
  turn_starts: np.ndarray
  turn_ends: np.ndarray
  messages: list
  reward: float = 0.0
  info: dict = dataclasses.field(default_factory=dict)
  finish_reason: str = ""  # answer|submitted|max_turns|max_tokens|length|timeout|deviation
  num_tool_calls: int = 0
  num_tool_errors: int = 0
  parallel_turns: int = 0  # turns with more than one tool call

  def __post_init__(self):
    tokens = np.asarray(self.tokens, np.int32).reshape(-1)
    values = {f.name: getattr(self, f.name) for f in TOKEN_FIELDS}
    for name, arr in fields.token_arrays("Rollout", values, tokens.size).items():
      setattr(self, name, arr)
    raw = np.zeros(tokens.size, np.float32) if self.raw_logprobs is None else self.raw_logprobs
    self.raw_logprobs = np.asarray(raw, np.float32)

  @property
  def num_turns(self) -> int:
    return len(self.turn_starts)

  def to_tree(self, group_id: int = 0, policy_version: int = 0) -> tree.Trajectory:
    """The record as a `katjax.core.tree.Trajectory` (input of `build_tree`)."""
    return tree.Trajectory(**{f.name: getattr(self, f.name) for f in TOKEN_FIELDS},
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
    rec.add(gen, loss_mask=1, flags=_call_flags(gen, *call_ids), **_sampled(comp))
    rec.turn_ends.append(len(rec.tokens))
    text = tokenizer.decode(gen)
    content, calls, errors = tokenizer.parse_tool_calls(text)
    if (calls or errors) and call_ids[0] is None:  # no single-token tag: flag the whole turn
      rec.chunks["flags"][-1] |= TOOL_CALL
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
    flag = TOOL_RESULT | (TOOL_ERROR if any(o.startswith("Error") for _, o in results) else 0)
    rec.add(tokenizer.encode(delta), flags=flag)
    if monitor is not None:
      generated = np.asarray(rec.tokens, np.int32)[rec.array("loss_mask").astype(bool)]
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
  """Per-token arrays of the record, appended span by span (one chunk per `add`)."""

  NAMES = tuple(f.name for f in TOKEN_FIELDS) + ("raw_logprobs",)

  def __init__(self):
    self.tokens = []  # ints: the exact prompt of the next turn
    self.chunks = {n: [] for n in self.NAMES}
    self.turn_starts, self.turn_ends = [], []

  def add(self, ids, **values):
    """Appends tokens `ids` with per-token values (arrays or scalars) by field name; a field
    not given gets its pad value."""
    n = len(ids)
    self.tokens += [int(i) for i in ids]
    for name in self.NAMES:
      value = np.asarray(ids) if name == "tokens" else values.get(name)
      dtype = np.float32 if name == "raw_logprobs" else fields.FIELD[name].dtype
      pad = 0 if name == "raw_logprobs" else fields.FIELD[name].pad
      arr = np.full(n, pad, dtype) if value is None else np.asarray(value, dtype)
      self.chunks[name].append(np.array(np.broadcast_to(arr, (n,))))

  def array(self, name):
    return np.concatenate(self.chunks[name]) if self.chunks[name] else np.zeros(0)

  def finish(self, messages, reward, info, finish, n_calls, n_errors, parallel):
    return Rollout(**{n: self.array(n) for n in self.NAMES},
                   turn_starts=np.asarray(self.turn_starts, np.int32).reshape(-1),
                   turn_ends=np.asarray(self.turn_ends, np.int32).reshape(-1),
                   messages=messages, reward=reward, info=info, finish_reason=finish,
                   num_tool_calls=n_calls, num_tool_errors=n_errors, parallel_turns=parallel)


def _sampled(comp) -> dict:
  """A completion's per-token outputs by field name. A backend that does not report a field
  (an external server: no `version`) leaves it at the field's pad value."""
  entropy = getattr(comp, "entropy", None)
  if entropy is None:  # a Completion from before the sampler's rename to `entropy`
    entropy = getattr(comp, "entropies", None)
  return {"logprobs": comp.logprobs, "raw_logprobs": comp.raw_logprobs, "entropy": entropy,
          "version": getattr(comp, "version", None)}


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


def _call_flags(gen, open_id, close_id):
  """TOOL_CALL on tokens from each `<tool_call>` through its `</tool_call>`."""
  flags = np.zeros(len(gen), np.int32)
  if open_id is None or close_id is None:
    return flags
  inside = False
  for i, t in enumerate(gen):
    inside = inside or t == open_id
    if inside:
      flags[i] = TOOL_CALL
    if t == close_id:
      inside = False
  return flags
