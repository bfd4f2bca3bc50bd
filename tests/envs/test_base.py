"""Environment protocol: concurrent step, error observations, registry, JSONL tasks."""

import json
import threading
import time

import pytest

from katjax.envs import (Environment, ToolCall, ToolError, load_tasks, make_env, register_env,
                         tool_spec)
from katjax.envs.toy import generate_tasks, safe_eval


@register_env("_test_sleepy")
class SleepyEnv(Environment):
  def __init__(self, delay: float = 0.3):
    super().__init__()
    self.delay, self.threads = delay, set()

  def reset(self, task):
    self.tools = [tool_spec("nap", "sleep then echo", {"text": {"type": "string"}}),
                  tool_spec("boom", "always fails", {})]
    return [{"role": "user", "content": "hi"}], self.tools

  def tool_nap(self, text):
    self.threads.add(threading.get_ident())
    time.sleep(self.delay)
    return text.upper()

  def tool_boom(self):
    raise RuntimeError("kaput")

  def evaluate(self):
    return 0.0, {}


def test_step_runs_calls_concurrently_and_in_order():
  env = make_env("_test_sleepy", delay=0.3)
  env.reset({})
  start = time.monotonic()
  obs, done = env.step([ToolCall(str(i), "nap", {"text": f"t{i}"}) for i in range(4)])
  assert obs == ["T0", "T1", "T2", "T3"] and done is False
  assert time.monotonic() - start < 0.3 * 4 * 0.75  # serial would take 1.2 s
  assert len(env.threads) > 1


def test_bad_calls_become_error_observations():
  env = make_env("_test_sleepy", delay=0.0)
  env.reset({})
  obs, _ = env.step([
    ToolCall("a", "nope", {}),
    ToolCall("b", "nap", {"wrong": 1}),
    ToolCall("c", "boom", {}),
    {"id": "d", "type": "function", "function": {"name": "nap", "arguments": "{not json"}},
    {"id": "e", "type": "function", "function": {"name": "nap", "arguments": '{"text": "ok"}'}},
  ])
  assert obs[0].startswith("Error: unknown tool 'nope'")
  assert "missing ['text']" in obs[1] and "unexpected ['wrong']" in obs[1]
  assert obs[2] == "Error: tool 'boom' failed: RuntimeError: kaput"
  assert "not valid JSON" in obs[3]
  assert obs[4] == "OK"


def test_unknown_env_and_bad_options():
  with pytest.raises(ValueError, match="unknown environment 'no_such_env'.*arithmetic"):
    make_env("no_such_env")
  with pytest.raises(ValueError, match="bad options for environment 'arithmetic'"):
    make_env("arithmetic", colour="blue")


def test_load_tasks(tmp_path):
  p = tmp_path / "t.jsonl"
  p.write_text('{"question": "q", "answer": 1}\n\n{"question": "r", "answer": 2}\n')
  assert [t["answer"] for t in load_tasks(str(p), required=("question",))] == [1, 2]
  p.write_text('{"question": "q"}\n[1]\n')
  with pytest.raises(ValueError, match=r"t.jsonl:2: a task must be a JSON object"):
    load_tasks(str(p))
  with pytest.raises(ValueError, match=r"t.jsonl:1: task is missing fields \['answer'\]"):
    load_tasks(str(p), required=("answer",))
  p.write_text('{"question": \n')
  with pytest.raises(ValueError, match="t.jsonl:1: invalid JSON"):
    load_tasks(str(p))
  with pytest.raises(FileNotFoundError):
    load_tasks(str(tmp_path / "missing.jsonl"))


def test_arithmetic_episode():
  tasks = generate_tasks(20, seed=3)
  for task in tasks:
    # Independent reference: Python's own evaluation of the generated expression.
    assert task["answer"] == eval(task["question"][len("What is "):-1])  # noqa: S307
  env = make_env("arithmetic")
  msgs, tools = env.reset(tasks[0])
  assert msgs[-1]["content"] == tasks[0]["question"]
  assert {t["function"]["name"] for t in tools} == {"calculator", "submit"}
  expr = tasks[0]["question"][len("What is "):-1]
  obs, done = env.step([ToolCall("1", "calculator", {"expression": expr})])
  assert obs == [str(tasks[0]["answer"])] and not done
  obs, done = env.step([ToolCall("2", "submit", {"answer": obs[0]})])
  assert done and env.evaluate()[0] == 1.0
  env.reset(tasks[1])
  env.step([ToolCall("1", "submit", {"answer": str(tasks[1]["answer"] + 1)})])
  assert env.evaluate()[0] == 0.0
  env.reset(tasks[2])
  assert env.evaluate()[0] == 0.0  # nothing submitted


@pytest.mark.parametrize("expr", ["__import__('os')", "2 ** 10 ** 10", "1 / 0", "x + 1", "(1"])
def test_calculator_rejects(expr):
  with pytest.raises(ToolError):
    safe_eval(expr)


def test_toolcall_from_openai():
  c = ToolCall.from_openai({"id": "x", "type": "function",
                            "function": {"name": "f", "arguments": json.dumps({"a": 1})}})
  assert c == ToolCall("x", "f", {"a": 1})
