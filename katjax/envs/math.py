"""Math environment: the answer is checked by exact, numeric or symbolic equivalence.

Task: {"problem": str, "answer": str (LaTeX or plain)}. Tools: `submit(answer)` and, when
`python=True`, `python(code)` run in a `LocalSandbox` (no network, rlimits). `check_answer`
tries, in order: normalised exact match, numeric equality (fractions, percents, thousands
separators), then `math_verify` (a maintained LaTeX/sympy checker), falling back to sympy.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

from katjax.envs.base import Environment, ToolError, register_env, tool_spec

__all__ = ["MathEnv", "check_answer", "extract_boxed"]

SYSTEM_PROMPT = "Solve the problem. Call submit with the final answer (a number or expression)."


@register_env("math")
class MathEnv(Environment):
  """Single-answer math tasks; reward 1.0 iff the submitted answer is equivalent to the truth."""

  def __init__(self, python: bool = False, timeout: float = 10.0,
               system_prompt: str = SYSTEM_PROMPT):
    super().__init__()
    self.python, self.timeout, self.system_prompt = python, timeout, system_prompt
    self.task: dict | None = None
    self.submitted: str | None = None
    self._sandbox = None

  def reset(self, task: dict):
    for key in ("problem", "answer"):
      if key not in task:
        raise ValueError(f"math task is missing {key!r} (keys: {sorted(task)})")
    self.close()
    self.task, self.submitted, self.done = task, None, False
    self.tools = [tool_spec("submit", "Submit the final answer and end the episode.",
                            {"answer": {"type": "string"}})]
    if self.python:
      self.tools.insert(0, tool_spec("python", "Run a Python 3 script; returns its output.",
                                     {"code": {"type": "string"}}))
    return [{"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task["problem"]}], self.tools

  def tool_python(self, code) -> str:
    if self._sandbox is None:
      from katjax.sandbox.local import LocalSandbox  # lazy: only when the tool is enabled
      self._sandbox = LocalSandbox()
    self._sandbox.write_file("main.py", str(code))
    out, code_, timed_out = self._sandbox.exec("python3 main.py", timeout=self.timeout)
    if timed_out:
      return out + f"\n[killed after {self.timeout}s]"
    return out if code_ == 0 else out + f"\n[exit code {code_}]"

  def tool_submit(self, answer) -> str:
    if self.done:
      raise ToolError("an answer was already submitted")
    self.submitted, self.done = str(answer), True
    return "Answer submitted."

  def evaluate(self):
    if self.task is None:
      raise ValueError("evaluate() called before reset()")
    if self.submitted is None:
      return 0.0, {"submitted": None, "method": "no answer"}
    ok, method = check_answer(self.submitted, str(self.task["answer"]))
    return float(ok), {"submitted": self.submitted, "answer": self.task["answer"], "method": method}

  def close(self):
    if self._sandbox is not None:
      self._sandbox.close()
      self._sandbox = None


def check_answer(pred: str, gold: str) -> tuple[bool, str]:
  """(equivalent?, the method that decided: exact | numeric | symbolic | none)."""
  p, g = _normalise(extract_boxed(pred) or pred), _normalise(extract_boxed(gold) or gold)
  if not p:
    return False, "none"
  if p == g:
    return True, "exact"
  pn, gn = _to_number(p), _to_number(g)
  if pn is not None and gn is not None:
    return abs(pn - gn) <= 1e-9 * max(1.0, abs(gn)), "numeric"
  return _symbolic_equal(pred, gold), "symbolic"


def extract_boxed(text: str) -> str | None:
  r"""Contents of the last \boxed{...} (brace-balanced), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def _normalise(s: str) -> str:
  s = s.strip().strip("$").strip()
  s = re.sub(r"\\(left|right|,|!|;|displaystyle)", "", s)
  s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = re.sub(r"\s+", "", s).rstrip(".")
  return s


def _to_number(s: str) -> float | None:
  s = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
  m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
  if m:
    s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
  pct = s.endswith("%")
  s = s.rstrip("%")
  try:
    value = float(Fraction(s))
  except (ValueError, ZeroDivisionError):
    return None
  return value / 100 if pct else value


def _symbolic_equal(pred: str, gold: str) -> bool:
  # math_verify guards parsing with SIGALRM, which only works on the main thread; rollouts
  # call evaluate() from worker threads, so the timeout is disabled there.
  main = threading.current_thread() is threading.main_thread()
  try:
    import math_verify
  except ImportError:
    math_verify = None
  if math_verify is not None:
    timeout = 5 if main else None
    try:
      g = math_verify.parse(_as_latex(gold), parsing_timeout=timeout)
      p = math_verify.parse(_as_latex(pred), parsing_timeout=timeout)
      return bool(g and p and math_verify.verify(g, p, timeout_seconds=timeout))
    except Exception:  # a checker crash on odd input means "not equal", never a crash
      return False
  try:
    import sympy
    diff = sympy.simplify(sympy.sympify(_normalise(pred)) - sympy.sympify(_normalise(gold)))
    return diff == 0
  except Exception:
    return False


def _as_latex(s: str) -> str:
  # math_verify's LaTeX extractor wants math delimiters; bare answers get wrapped.
  return s if ("$" in s or "\\boxed" in s) else f"${s}$"
