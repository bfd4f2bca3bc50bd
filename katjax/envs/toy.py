"""Toy tool-use environment "arithmetic": small enough for a tiny model to learn end to end.

Task: {"question": "What is 17 + 5 * 3?", "answer": 32}. Tools: `calculator(expression)`
evaluates an arithmetic expression (a safe AST walk, never `eval`), `submit(answer)` ends the
episode. Reward 1.0 iff the submitted answer equals the true one (numerically).
"""

from __future__ import annotations

import ast
import operator
import random

from katjax.envs.base import Environment, ToolError, register_env, tool_spec

__all__ = ["ArithmeticEnv", "generate_tasks", "safe_eval"]

SYSTEM_PROMPT = ("Solve the arithmetic problem. You may call the calculator tool; "
                 "finish by calling submit with the final number.")


@register_env("arithmetic")
class ArithmeticEnv(Environment):
  """In-memory arithmetic env; tools `calculator` and `submit`."""

  def __init__(self, system_prompt: str = SYSTEM_PROMPT):
    super().__init__()
    self.system_prompt = system_prompt
    self.task: dict | None = None
    self.submitted: str | None = None
    self.num_calls = 0

  def reset(self, task: dict):
    if "question" not in task or "answer" not in task:
      raise ValueError(f"arithmetic task needs 'question' and 'answer', got keys {sorted(task)}")
    self.task, self.submitted, self.done, self.num_calls = task, None, False, 0
    self.tools = [
      tool_spec("calculator", "Evaluate an arithmetic expression (+ - * / // % **, parentheses).",
                {"expression": {"type": "string"}}),
      tool_spec("submit", "Submit the final answer and end the episode.",
                {"answer": {"type": "string"}}),
    ]
    messages = [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": task["question"]}]
    return messages, self.tools

  def tool_calculator(self, expression) -> str:
    self.num_calls += 1
    value = safe_eval(str(expression))
    return _fmt(value)

  def tool_submit(self, answer) -> str:
    if self.done:
      raise ToolError("an answer was already submitted")
    self.submitted = str(answer).strip()
    self.done = True
    return "Answer submitted."

  def evaluate(self):
    if self.task is None:
      raise ValueError("evaluate() called before reset()")
    truth = float(self.task["answer"])
    correct = False
    if self.submitted is not None:
      try:
        correct = abs(float(self.submitted.replace(",", "")) - truth) <= 1e-6 * max(1.0, abs(truth))
      except ValueError:
        correct = False
    return float(correct), {"submitted": self.submitted, "answer": self.task["answer"],
                            "calculator_calls": self.num_calls}


def generate_tasks(n: int, seed: int = 0, max_operand: int = 20, n_ops: int = 2) -> list[dict]:
  """n seeded tasks like "What is 3 + 4 * 5?" with their integer answers."""
  rng = random.Random(seed)
  tasks = []
  for i in range(n):
    expr = str(rng.randint(1, max_operand))
    for _ in range(n_ops):
      expr += f" {rng.choice('+-*')} {rng.randint(1, max_operand)}"
    tasks.append({"id": f"arith-{seed}-{i}", "question": f"What is {expr}?",
                  "answer": int(safe_eval(expr))})
  return tasks


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expression: str) -> float | int:
  """Evaluates +, -, *, /, //, %, ** over numbers; ToolError for anything else."""
  if len(expression) > 500:
    raise ToolError("expression too long (max 500 characters)")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise ToolError(f"invalid expression: {e.msg}") from None
  return _eval_node(tree.body)


def _eval_node(node):
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return node.value
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    left, right = _eval_node(node.left), _eval_node(node.right)
    # Bound powers so `9**9**9` cannot hang the env.
    if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
      raise ToolError("exponent too large")
    try:
      return _BINOPS[type(node.op)](left, right)
    except ZeroDivisionError:
      raise ToolError("division by zero") from None
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
    return _UNOPS[type(node.op)](_eval_node(node.operand))
  raise ToolError(f"unsupported expression element: {type(node).__name__}")


def _fmt(value) -> str:
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
    return str(int(value))
  return repr(value)
