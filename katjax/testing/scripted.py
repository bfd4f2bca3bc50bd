"""A scripted model for the one episode runner (`katjax.rollout.agent.run_episode`).

Tests and benchmarks that need an episode without a model (a fixed sequence of tool calls,
an agent that crashes) play the model's part with `ScriptedBackend`: each turn's reply is
rendered as assistant text with `<tool_call>` blocks and returned as a `Completion`, so the
episode goes through exactly the loop a model would (tool-call parsing, error observations,
limits, records). `run_scripted` runs one episode with the byte tokenizer and loose limits.
"""

from __future__ import annotations

import json

import numpy as np

from katjax.envs.base import ToolCall
from katjax.model import ByteTokenizer
from katjax.rollout.agent import AgentLimits, Rollout, run_episode
from katjax.rollout.sampler import Completion

__all__ = ["ScriptedBackend", "run_scripted", "render_calls"]


class ScriptedBackend:
  """A backend whose turn k replies with `replies[k]` (the last one repeats).

  A reply is assistant text (str), a list of `ToolCall`s (rendered as `<tool_call>` blocks),
  an exception instance (raised, as a crashing model or server would), or a callable
  `(turn, prompt_ids) -> reply`. Records the prompts it was given.
  """

  def __init__(self, replies, tokenizer=None):
    self.replies = list(replies) if isinstance(replies, (list, tuple)) else [replies]
    if not self.replies:
      raise ValueError("ScriptedBackend needs at least one reply")
    self.tokenizer = tokenizer or ByteTokenizer()
    self.prompts = []

  def generate(self, prompts, sampling, n=1, seed=0, cancelled=None):
    (prompt,) = prompts
    turn = len(self.prompts)
    self.prompts.append([int(t) for t in prompt])
    reply = self.replies[min(turn, len(self.replies) - 1)]
    if callable(reply) and not isinstance(reply, BaseException):
      reply = reply(turn, self.prompts[-1])
    if isinstance(reply, BaseException):
      raise reply
    text = reply if isinstance(reply, str) else render_calls(reply)
    ids = (self.tokenizer.encode(text) + [self.tokenizer.eos_id])[:sampling.max_new_tokens]
    k = len(ids)
    finish = "stop" if ids and ids[-1] == self.tokenizer.eos_id else "length"
    zeros = np.zeros(k, np.float32)
    return [[Completion(tokens=np.asarray(ids, np.int32), logprobs=zeros, raw_logprobs=zeros,
                        entropy=zeros, finish_reason=finish, prompt_len=len(prompt))]]


def render_calls(calls) -> str:
  """`<tool_call>` blocks (the chat format the tokenizer parses) for ToolCalls."""
  out = []
  for c in calls:
    if not isinstance(c, ToolCall):
      raise ValueError(f"a scripted reply lists ToolCalls, got {type(c).__name__}")
    out.append("<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments})
               + "\n</tool_call>")
  return "\n".join(out)


def run_scripted(env, task: dict, replies, *, max_turns: int = 32,
                 max_seconds: float = 600.0) -> Rollout:
  """One `run_episode` of `env` on `task` driven by `ScriptedBackend(replies)` (byte
  tokenizer; token limits loose enough for any scripted episode)."""
  limits = AgentLimits(max_turns=max_turns, max_tokens=1 << 24, max_new_tokens=1 << 20,
                       max_seconds=max_seconds)
  return run_episode(ScriptedBackend(replies), ByteTokenizer(), env, task, limits=limits)
