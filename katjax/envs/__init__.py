"""Unified environment interface (reset / step / evaluate / close) and the built-in envs."""

from katjax.envs.base import (Environment, ToolCall, ToolError, list_envs, load_tasks,
                              make_env, register_env, tool_spec)

__all__ = ["Environment", "ToolCall", "ToolError", "list_envs", "load_tasks", "make_env",
           "register_env", "tool_spec"]
