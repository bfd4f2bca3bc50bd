"""The one environment protocol: reset -> messages + tools, step(tool calls), evaluate, close.

Every task type (toy arithmetic, math, SWE) implements `Environment`. The agent loop only
sees this interface: it renders `reset`'s messages and tool specs with the chat template,
parses the model's tool calls into `ToolCall`s, feeds them to `step` and appends the
observations as tool messages until `done`, then asks `evaluate` for the reward.

`step` never raises for a bad call: unknown tools, wrong arguments and `ToolError`s become
error observation strings, so a malformed model output costs a turn, not the rollout.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import inspect
import json
import os
from typing import Any, Callable

__all__ = [
  "ToolCall", "ToolError", "Environment", "register_env", "make_env", "list_envs",
  "load_tasks", "tool_spec", "check_tool_call",
]


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One tool call parsed from the model's output (OpenAI style, arguments already decoded)."""
  id: str
  name: str
  arguments: dict

  @classmethod
  def from_openai(cls, call: dict) -> "ToolCall":
    """Builds a ToolCall from {"id", "function": {"name", "arguments": str JSON or dict}}."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
      try:
        args = json.loads(args) if args.strip() else {}
      except json.JSONDecodeError as e:
        # Keep the raw text: step() reports it as an error observation.
        args = {"__invalid_json__": f"{e.msg} at position {e.pos}"}
    return cls(id=str(call.get("id", "")), name=str(fn.get("name", "")), arguments=args)


class ToolError(Exception):
  """Raised by a tool for a bad call; `step` turns it into an error observation."""


def tool_spec(name: str, description: str, properties: dict | None = None,
              required: list[str] | None = None) -> dict:
  """An OpenAI function schema {"type": "function", "function": {...}}."""
  properties = properties or {}
  return {"type": "function", "function": {
    "name": name, "description": description,
    "parameters": {"type": "object", "properties": properties,
                   "required": list(required if required is not None else properties)}}}


def check_tool_call(call: ToolCall, specs: dict, *, types: bool = False) -> str | None:
  """What is wrong with `call` against the tool specs {name: OpenAI function spec}, or None.

  The one tool-argument check: unknown tool, arguments that are not a JSON object (or not
  valid JSON), missing required / unexpected arguments and, with `types`, arguments of the
  wrong JSON type. `Environment.call_tool` raises its answer as a ToolError without `types`
  (tools coerce their arguments, e.g. str(answer)); the RFT deviation monitor
  (`katjax.rollout.deviation`) counts it with `types` (a schema deviation).
  """
  spec = specs.get(call.name)
  if spec is None:
    names = ", ".join(specs) or "none"
    return f"unknown tool {call.name!r}; available tools: {names}"
  args = call.arguments
  if isinstance(args, dict) and "__invalid_json__" in args:
    return (f"arguments of {call.name!r} are not a JSON object: not valid JSON "
            f"({args['__invalid_json__']})")
  if not isinstance(args, dict):
    return f"arguments of {call.name!r} are not a JSON object"
  params = spec.get("parameters", {})
  props = params.get("properties", {})
  missing = [k for k in params.get("required", []) if k not in args]
  extra = [k for k in args if k not in props]
  wrong = [k for k, v in args.items()
           if types and k in props and not _json_type_ok(v, props[k].get("type"))]
  if missing or extra or wrong:
    return (f"bad arguments for {call.name!r}: missing {missing}, unexpected {extra}"
            + (f", wrong type {wrong}" if types else ""))
  return None


class Environment(abc.ABC):
  """Base class of every environment.

  Subclasses implement `reset`, `evaluate` and either `call_tool` or one method
  `tool_<name>(**arguments) -> str` per tool (the default `call_tool` dispatches to them and
  checks the arguments against the tool's spec). Set `self.done = True` when the episode
  ends (e.g. on `submit`).
  """

  max_concurrent_tools: int = 8

  def __init__(self):
    self.done = False
    self.tools: list[dict] = []

  @abc.abstractmethod
  def reset(self, task: dict) -> tuple[list[dict], list[dict]]:
    """Starts an episode: returns (initial messages, OpenAI tool specs)."""

  @abc.abstractmethod
  def evaluate(self) -> tuple[float, dict]:
    """Scores the episode: (reward, info)."""

  def close(self) -> None:
    """Releases resources (sandboxes, temp dirs). Safe to call twice."""

  def call_tool(self, call: ToolCall) -> str:
    """Runs one tool call and returns its observation; raises ToolError for a bad call."""
    specs = {t["function"]["name"]: t["function"] for t in self.tools
             if hasattr(self, f"tool_{t['function']['name']}")}
    problem = check_tool_call(call, specs)
    if problem:
      raise ToolError(problem)
    return str(getattr(self, f"tool_{call.name}")(**call.arguments))

  def step(self, calls: list[ToolCall]) -> tuple[list[str], bool]:
    """Runs all calls concurrently; returns (one observation per call, in order; done)."""
    calls = [c if isinstance(c, ToolCall) else ToolCall.from_openai(c) for c in calls]
    if not calls:
      return [], self.done
    if len(calls) == 1:
      return [self._safe_call(calls[0])], self.done
    workers = min(len(calls), self.max_concurrent_tools)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      observations = list(pool.map(self._safe_call, calls))
    return observations, self.done

  def _safe_call(self, call: ToolCall) -> str:
    try:
      return self.call_tool(call)
    except ToolError as e:
      return f"Error: {e}"
    except TypeError as e:
      return f"Error: bad arguments for {call.name!r}: {e}"
    except Exception as e:  # a broken tool must not end the rollout
      return f"Error: tool {call.name!r} failed: {type(e).__name__}: {e}"

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register_env(name: str):
  """Class decorator: `@register_env("swe") class SWEEnv(Environment): ...`."""
  def decorate(cls):
    if name in _REGISTRY and _REGISTRY[name] is not cls:
      raise ValueError(f"environment name {name!r} is already registered to {_REGISTRY[name]}")
    _REGISTRY[name] = cls
    return cls
  return decorate


def make_env(name: str, **kwargs) -> Environment:
  """Instantiates a registered environment by name; ValueError naming the known ones."""
  _import_builtin_envs()
  if name not in _REGISTRY:
    raise ValueError(f"unknown environment {name!r}; registered: {sorted(_REGISTRY)}")
  cls = _REGISTRY[name]
  try:
    inspect.signature(cls).bind(**kwargs)
  except TypeError as e:
    raise ValueError(f"bad options for environment {name!r}: {e}") from None
  return cls(**kwargs)


def list_envs() -> list[str]:
  """Names of all registered environments."""
  _import_builtin_envs()
  return sorted(_REGISTRY)


def load_tasks(jsonl_path: str, required: tuple[str, ...] = ()) -> list[dict]:
  """Reads one task dict per line of a JSONL file (blank lines skipped).

  Raises ValueError naming the file and line for bad JSON, a non-object line or a missing
  required field, and FileNotFoundError for a missing file.
  """
  if not os.path.exists(jsonl_path):
    raise FileNotFoundError(f"task file not found: {jsonl_path}")
  tasks = []
  with open(jsonl_path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        task = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{jsonl_path}:{lineno}: invalid JSON: {e.msg}") from None
      if not isinstance(task, dict):
        raise ValueError(f"{jsonl_path}:{lineno}: a task must be a JSON object")
      missing = [k for k in required if k not in task]
      if missing:
        raise ValueError(f"{jsonl_path}:{lineno}: task is missing fields {missing}")
      tasks.append(task)
  return tasks


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
               "object": dict, "array": list, "null": type(None)}


def _json_type_ok(value, expected) -> bool:
  if expected is None:
    return True
  names = expected if isinstance(expected, list) else [expected]
  for name in names:
    py = _JSON_TYPES.get(name)
    if py is None:
      return True  # a type we do not know: do not call it wrong
    if name in ("integer", "number") and isinstance(value, bool):
      continue  # JSON true is not a number
    if isinstance(value, py):
      return True
  return False


def _import_builtin_envs():
  # Registration happens on import; importing here keeps `make_env("swe")` working even
  # when the caller only imported katjax.envs.base.
  import importlib
  for mod in _BUILTIN_ENV_MODULES:
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:  # only a not-yet-written builtin module is skipped
        raise


_BUILTIN_ENV_MODULES = ("katjax.envs.toy", "katjax.envs.math", "katjax.envs.swe",
                        "katjax.envs.lookup")
