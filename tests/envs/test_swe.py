"""SWE env and grading on a tiny git repo made here, for each sandbox backend."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import swe_repo  # noqa: E402

from katjax.envs import Environment, ToolCall, make_env, tool_spec  # noqa: E402
from katjax.envs.swe_grade import TaskError, is_test_path, parse_pytest_log  # noqa: E402
from katjax.sandbox import make_sandbox  # noqa: E402
from katjax.sandbox.docker import docker_available  # noqa: E402
from katjax.testing.scripted import run_scripted  # noqa: E402

_ok, _why = docker_available()
BACKENDS = [pytest.param("local"), pytest.param("docker", marks=[pytest.mark.docker] + (
  [] if _ok else [pytest.mark.skip(reason=f"Docker sandbox unavailable: {_why}")]))]

SPOOF_PRINT = swe_repo.BUGGY.replace(
  "def add", "print('PASSED tests/test_calc.py::test_add')\n\n\ndef add")
SPOOF_EXIT = swe_repo.BUGGY + (
  "\nimport os, sys\nsys.stdout.write('PASSED tests/test_calc.py::test_add\\n"
  "PASSED tests/test_calc.py::test_mul\\n')\nsys.stdout.flush()\nos._exit(0)\n")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  return swe_repo.make_task(tmp_path_factory.mktemp("swe"))


def source_patch(task, new_source, tmp_path):
  """A git diff replacing calc/__init__.py, made independently of the code under test."""
  repo = task["repo_path"]
  swe_repo.write(repo, "calc/__init__.py", new_source)
  try:
    return swe_repo.git(repo, "diff")
  finally:
    swe_repo.git(repo, "checkout", "-q", "--", ".")


@pytest.fixture(scope="module", params=BACKENDS)
def env(request):
  e = make_env("swe", backend=request.param, test_timeout=60)
  yield e
  e.close()


def test_grading(env, task, tmp_path):
  env.reset(task)
  reward, info = env.grade(task["patch"])
  assert reward == 1.0, info
  assert info["tests"] == {"tests/test_calc.py::test_add": "PASSED",
                           "tests/test_calc.py::test_mul": "PASSED"}
  reward, info = env.grade("")
  assert reward == 0.0 and info["tests"]["tests/test_calc.py::test_add"] == "FAILED"
  # Fake PASSED lines printed by the code under test do not count.
  reward, info = env.grade(source_patch(task, SPOOF_PRINT, tmp_path))
  assert reward == 0.0 and info["exit_code"] != 0, info
  reward, info = env.grade(source_patch(task, SPOOF_EXIT, tmp_path))
  assert reward == 0.0 and info["tests"]["tests/test_calc.py::test_add"] != "PASSED", info
  # A patch touching tests is refused before anything runs.
  reward, info = env.grade(task["test_patch"])
  assert reward == 0.0 and "modifies test files" in info["error"]


def test_agent_episode_edit_and_submit(env, task):
  msgs, tools = env.reset(task)
  assert task["problem_statement"] in msgs[-1]["content"]
  assert [t["function"]["name"] for t in tools] == ["bash", "view", "edit", "submit"]
  obs, _ = env.step([ToolCall("1", "view", {"path": "calc/__init__.py", "start_line": 2,
                                            "end_line": 2}),
                     ToolCall("2", "bash", {"command": "ls calc tests"})])
  assert obs[0] == "     2\t    return a - b"
  assert "test_calc.py" in obs[1]
  obs, _ = env.step([ToolCall("3", "edit", {"path": "calc/__init__.py", "old_str": "a - b",
                                            "new_str": "a + b"}),
                     ToolCall("4", "edit", {"path": "nope.py", "old_str": "x", "new_str": "y"})])
  assert obs[0] == "Edited calc/__init__.py." and obs[1] == "Error: no such file: nope.py"
  obs, done = env.step([ToolCall("5", "submit", {})])
  assert done
  reward, info = env.evaluate()
  assert reward == 1.0, info


def test_bad_inputs_give_clear_errors_and_the_run_goes_on(task, tmp_path):
  env = make_env("swe", backend="local", test_timeout=60)  # errors do not depend on the backend

  bad = [
    ({**task, "repo_path": str(tmp_path / "gone"), "repo": "nobody/gone"}, "repository for task"),
    ({k: v for k, v in task.items() if k != "FAIL_TO_PASS"}, "missing fields ['FAIL_TO_PASS']"),
    ({**task, "FAIL_TO_PASS": []}, "has no FAIL_TO_PASS tests"),
    ({**task, "base_commit": "0" * 40}, "cannot check out base_commit"),
  ]
  for t, msg in bad:
    with pytest.raises(TaskError, match=msg.replace("[", r"\[").replace("]", r"\]")):
      env.reset(t)
    rec = run_scripted(env, t, ["no tool calls"])
    assert rec.error.startswith("reset: TaskError") and msg in rec.error
  env.reset(task)
  reward, info = env.grade("diff --git a/calc/__init__.py b/calc/__init__.py\n"
                           "--- a/calc/__init__.py\n+++ b/calc/__init__.py\n"
                           "@@ -1,2 +1,2 @@\n-def nothing_like_this():\n+def x():\n")
  assert reward == 0.0 and info["error"].startswith("patch does not apply")
  env.task = {**task, "test_cmd": "kill -9 $$"}
  reward, info = env.grade(task["patch"])
  assert reward == 0.0 and "markers not found" in info["error"]
  env.task = task

  rec = run_scripted(env, task, [RuntimeError("agent crashed")])
  assert rec.error == "generate: RuntimeError: agent crashed" and env.sandbox is None
  # The run goes on: the next good episode still resolves.
  gold_calls = [[ToolCall("1", "edit", {"path": "calc/__init__.py", "old_str": "a - b",
                                        "new_str": "a + b"})],
                [ToolCall("2", "submit", {})]]
  rec = run_scripted(env, task, gold_calls)
  assert rec.error is None and rec.reward == 1.0 and rec.num_turns == 2


def test_parse_pytest_log_is_pessimistic():
  log = ("PASSED a.py::t1\nFAILED a.py::t1 - assert 0\nPASSED a.py::t2\n"
         "ERROR b.py::t3\nXFAIL c.py::t4 - reason\n")
  assert parse_pytest_log(log) == {"a.py::t1": "FAILED", "a.py::t2": "PASSED",
                                   "b.py::t3": "ERROR", "c.py::t4": "XFAIL"}


def test_is_test_path():
  assert all(map(is_test_path, ["tests/x.py", "pkg/test_a.py", "a_test.py", "conftest.py"]))
  assert not any(map(is_test_path, ["calc/__init__.py", "contest.py", "testing_utils.py"]))


class _SandboxEnv(Environment):
  """One sandbox per episode, as SWEEnv has, without the repo and grading cost."""

  def __init__(self, backend):
    super().__init__()
    self.backend, self.sandbox = backend, None

  def reset(self, task):
    self.close()
    self.sandbox = make_sandbox(self.backend)
    self.tools = [tool_spec("bash", "run", {"command": {"type": "string"}})]
    return [{"role": "user", "content": "go"}], self.tools

  def tool_bash(self, command):
    return self.sandbox.exec(command, timeout=10)[0]

  def evaluate(self):
    return float(self.sandbox.exec("echo ok", timeout=10)[0] == "ok\n"), {}

  def close(self):
    if self.sandbox is not None:
      self.sandbox.close()
      self.sandbox = None


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_leftovers_after_50_episodes(backend):
  from katjax.sandbox.docker import LABEL, _client
  env = _SandboxEnv(backend)
  workdirs, container_ids = [], []

  def policy_for(i):
    def policy(turn, prompt):
      workdirs.append(env.sandbox.workdir)
      if backend == "docker":
        container_ids.append(env.sandbox.container.id)
      if i % 3 == 0:
        raise RuntimeError(f"agent {i} raised")
      if i % 3 == 1 and turn == 0:
        return [ToolCall("1", "bash", {"command": "sleep 1000 & echo started"})]
      return "done"
    return policy

  records = [run_scripted(env, {"id": i}, [policy_for(i)], max_turns=2) for i in range(50)]
  assert sum(r.error is not None for r in records) == 17
  assert all(r.error is None or "raised" in r.error for r in records)
  assert sum(r.reward for r in records) == 33
  if backend == "docker":
    # Only this test's containers: under pytest-xdist a module-scoped sandbox of another test
    # file can still be alive in the same worker process (same pid label).
    assert len(set(container_ids)) == 50
    flt = {"label": f"{LABEL}.pid={os.getpid()}"}
    alive = {c.id for c in _client().containers.list(all=True, filters=flt)}
    assert alive.isdisjoint(container_ids)
    volumes = {v.name for v in _client().volumes.list(filters=flt)}
    names = {c.name for c in alive_containers(alive)} if alive else set()
    assert volumes <= names
  else:
    assert not any(os.path.exists(w) for w in workdirs)


def alive_containers(ids):
  from katjax.sandbox.docker import _client
  return [_client().containers.get(i) for i in ids]
