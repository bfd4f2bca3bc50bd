"""Run one episode with any policy, always closing the environment; errors become records.

`run_episode(env, task, policy)` is the smallest agent loop: the policy maps the transcript
so far to tool calls (an empty list ends the episode). Used by benchmarks, data checks and
tests; the model-driven agent loop lives in katjax.rollout and keeps the same guarantees.
"""

from __future__ import annotations

import time
import traceback
from typing import Callable

from katjax.envs.base import Environment, ToolCall

__all__ = ["run_episode"]

Policy = Callable[[list[dict], list[dict]], list[ToolCall]]


def run_episode(env: Environment, task: dict, policy: Policy, max_turns: int = 32) -> dict:
  """Runs reset -> (policy, step)* -> evaluate -> close and returns a record dict.

  Never raises for a bad task, a crashing policy or a failing evaluation: the record's
  `error` names the stage and the exception, `reward` is 0.0, and the env is closed.
  """
  record = {"task_id": task.get("instance_id", task.get("id")), "reward": 0.0, "info": {},
            "turns": 0, "error": None, "seconds": 0.0}
  start, stage = time.monotonic(), "reset"
  try:
    messages, tools = env.reset(task)
    stage = "policy"
    for _ in range(max_turns):
      calls = policy(messages, tools)
      if not calls:
        break
      record["turns"] += 1
      observations, done = env.step(calls)
      messages = messages + [
        {"role": "assistant", "content": "", "tool_calls": [
          {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
          for c in calls]}] + [
        {"role": "tool", "tool_call_id": c.id, "content": o} for c, o in zip(calls, observations)]
      if done:
        break
    stage = "evaluate"
    record["reward"], record["info"] = env.evaluate()
  except Exception as e:  # noqa: BLE001 - one bad episode must not stop a run
    record["error"] = f"{stage}: {type(e).__name__}: {e}"
    record["traceback"] = traceback.format_exc(limit=5)
  finally:
    env.close()
    record["seconds"] = time.monotonic() - start
  return record
