"""Math answer checking: exact, numeric, symbolic (math-verify), and the math env."""

import pytest

from katjax.envs import ToolCall, make_env
from katjax.envs.math import check_answer, extract_boxed


@pytest.mark.parametrize("pred,gold,ok", [
  ("42", "42", True),
  ("0.5", "1/2", True),
  ("\\frac{3}{4}", "0.75", True),
  ("50%", "0.5", True),
  ("1,000", "1000", True),
  ("\\boxed{7}", "7", True),
  ("(x+1)^2", "x^2+2x+1", True),
  ("\\sqrt{8}", "2\\sqrt{2}", True),
  ("3", "4", False),
  ("x^2", "x^3", False),
  ("", "1", False),
  ("banana", "7", False),
])
def test_check_answer(pred, gold, ok):
  assert check_answer(pred, gold)[0] is ok


def test_extract_boxed_nested():
  assert extract_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"
  assert extract_boxed("none") is None


def test_math_env_rewards():
  env = make_env("math")
  env.reset({"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}"})
  env.step([ToolCall("1", "submit", {"answer": "0.5"})])
  assert env.evaluate()[0] == 1.0
  with pytest.raises(ValueError, match="missing 'answer'"):
    env.reset({"problem": "no answer"})


def test_math_env_python_tool():
  env = make_env("math", python=True)
  _, tools = env.reset({"problem": "What is 2**20?", "answer": "1048576"})
  assert tools[0]["function"]["name"] == "python"
  obs, _ = env.step([ToolCall("1", "python", {"code": "print(2**20)"})])
  assert obs == ["1048576\n"]
  env.step([ToolCall("2", "submit", {"answer": obs[0].strip()})])
  assert env.evaluate()[0] == 1.0
  env.close()
