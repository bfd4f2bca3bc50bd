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
`run_episode` is katjax's one episode runner: a failing task, backend or environment is
recorded on the Rollout (`error`), never raised, and the environment is always closed
(scripted policies for tests and benchmarks drive it through `katjax.testing.scripted`).

`backend` is anything with `generate(prompts, sampling, n=, seed=, cancelled=)` returning
`Completion`s: the local `Sampler`, or `OpenAIClient` for an external server.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
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
  # answer|submitted|max_turns|max_tokens|length|timeout|deviation|error
  finish_reason: str = ""
  error: str | None = None  # "stage: Exception: message" when the episode failed
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

  The one episode runner. It never raises for a bad task, a failing backend or a broken
  environment: the Rollout's `error` names the stage (reset | generate | step | evaluate)
  and the exception, finish_reason is "error", the reward 0.0 and info["traceback"] holds
  the traceback; what was recorded before the failure is kept. The environment is closed
  when the episode ends, whatever happened. A bad tool call is not an episode error: it
  becomes an "Error: ..." observation (`Environment.step`) and is counted.

  monitor: an RFT `katjax.rollout.deviation.DeviationMonitor`, called after every turn that
  does not end the episode; when it says stop the episode ends ("deviation") and the tokens
  of the deviating turns are masked out of the loss (kept in the record).
  """
  ep = _Episode(backend, tokenizer, env, sampling or SamplingParams(
      max_new_tokens=limits.max_new_tokens), limits, seed, monitor)
  error, reward, info = None, 0.0, {}
  try:
    ep.play(task)
    ep.stage = "evaluate"
    reward, info = env.evaluate()
  except Exception as e:  # noqa: BLE001 - one bad episode must not stop a run
    error, ep.finish = f"{ep.stage}: {type(e).__name__}: {e}", "error"
    info = {"traceback": traceback.format_exc(limit=5)}
  finally:
    env.close()
  rollout = ep.rec.finish(ep.messages, float(reward), info, ep.finish, ep.n_calls,
                          ep.n_errors, ep.parallel)
  rollout.error = error
  if error is None and monitor is not None and monitor.verdict.stop:
    rollout = truncate_after(rollout, int(rollout.turn_starts[monitor.verdict.cut_turn]))
    rollout.info["deviation"] = monitor.verdict.reason
  return rollout


class _Episode:
  """The state of one episode between turns; `play` runs the turns (see `run_episode`)."""

  def __init__(self, backend, tokenizer, env, sampling, limits, seed, monitor):
    self.backend, self.tokenizer, self.env = backend, tokenizer, env
    self.sampling, self.limits, self.seed, self.monitor = sampling, limits, seed, monitor
    self.rec, self.messages, self.stage = _Recorder(), [], "reset"
    self.finish, self.n_calls, self.n_errors, self.parallel = "max_turns", 0, 0, 0

  def play(self, task):
    limits, rec, tokenizer = self.limits, self.rec, self.tokenizer
    deadline = time.monotonic() + limits.max_seconds
    messages, tools = self.env.reset(task)
    self.messages = messages = list(messages)
    ids, _ = tokenizer.encode_chat(messages, tools, add_generation_prompt=True)
    rec.add(ids)
    call_ids = _single_ids(tokenizer, TOOL_CALL_OPEN), _single_ids(tokenizer, TOOL_CALL_CLOSE)
    for turn in range(limits.max_turns):
      room = limits.max_tokens - len(rec.tokens)
      if room <= 0:
        self.finish = "max_tokens"
        return
      if time.monotonic() >= deadline:
        self.finish = "timeout"
        return
      self.stage = "generate"
      sp = dataclasses.replace(self.sampling, max_new_tokens=min(
          self.sampling.max_new_tokens, limits.max_new_tokens, room))
      comp = self.backend.generate([np.asarray(rec.tokens, np.int32)], sp,
                                   seed=self.seed * 1000 + turn,
                                   cancelled=lambda _: time.monotonic() >= deadline)[0][0]
      gen = np.asarray(comp.tokens, np.int32)
      rec.turn_starts.append(len(rec.tokens))
      rec.add(gen, loss_mask=1, flags=_call_flags(gen, *call_ids), **_sampled(comp))
      rec.turn_ends.append(len(rec.tokens))
      content, calls, errors = tokenizer.parse_tool_calls(tokenizer.decode(gen))
      if (calls or errors) and call_ids[0] is None:  # no single-token tag: flag the turn
        rec.chunks["flags"][-1] |= TOOL_CALL
      tool_calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:12]}", name=c["name"],
                             arguments=c["arguments"]) for c in calls]
      messages.append(_assistant_message(content, tool_calls))
      if comp.finish_reason == "cancelled":
        self.finish = "timeout"
        return
      if comp.finish_reason != "stop":  # cut by max_new_tokens: the turn never closed
        self.finish = "max_tokens" if sp.max_new_tokens == room else "length"
        return
      if not calls and not errors:
        self.finish = "answer"
        return
      self.stage = "step"
      observations, done = self.env.step(tool_calls) if tool_calls else ([], self.env.done)
      self.n_calls += len(tool_calls) + len(errors)
      self.parallel += len(tool_calls) + len(errors) > 1
      results = [(c.id, obs) for c, obs in zip(tool_calls, observations)]
      results += [("", f"Error: {err}") for err in errors]
      self.n_errors += sum(obs.startswith("Error") for _, obs in results)
      before = len(messages)
      messages += [{"role": "tool", "tool_call_id": cid, "content": obs} for cid, obs in results]
      delta = _template_delta(tokenizer, messages, before, tools)
      failed = any(o.startswith("Error") for _, o in results)
      rec.add(tokenizer.encode(delta), flags=TOOL_RESULT | (TOOL_ERROR if failed else 0))
      if self.monitor is not None:
        generated = np.asarray(rec.tokens, np.int32)[rec.array("loss_mask").astype(bool)]
        if self.monitor(tool_calls, generated=generated, malformed=len(errors)).stop:
          self.finish = "deviation"
          return
      if done:
        self.finish = "submitted"
        return


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
  return {"logprobs": comp.logprobs, "raw_logprobs": comp.raw_logprobs,
          "entropy": comp.entropy, "version": getattr(comp, "version", None)}


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
