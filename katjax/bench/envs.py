"""Episode throughput of the SWE env per sandbox backend: reset + 10 commands + grade.

`python -m katjax.bench.envs [--episodes N]` prints one JSON object:
{"local": {"1": episodes/min, "4": episodes/min}, "docker": {...} or null with a reason}.
Each episode resets the SWE env on a small git repo (made here), runs 10 bash commands,
applies the fix through the edit tool, submits and is graded in a fresh sandbox; "4" runs
four such episodes concurrently (threads, one env each). Episodes run through the agent loop
with a scripted model (`katjax.testing.scripted`, byte tokenizer), as a model would drive them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import tempfile
import time

from katjax.envs import ToolCall, make_env
from katjax.testing.scripted import run_scripted

__all__ = ["main", "episode_throughput", "make_bench_task"]

COMMANDS = ["ls", "git status --short", "cat calc/__init__.py", "grep -n 'def ' calc/__init__.py",
            "python3 -c 'import calc; print(calc.add(2, 3))'", "wc -l calc/__init__.py",
            "git log --oneline | head -3", "ls tests", "head -3 tests/test_calc.py", "pwd"]


def episode_throughput(backend: str, task: dict, concurrency: int, episodes: int) -> float:
  """Episodes per minute with `concurrency` parallel episodes (each resolved, else raises)."""
  def one(_):
    env = make_env("swe", backend=backend, test_timeout=120)
    script = ([[ToolCall(str(i), "bash", {"command": c})] for i, c in enumerate(COMMANDS)]
              + [[ToolCall("e", "edit", {"path": "calc/__init__.py", "old_str": "a - b",
                                         "new_str": "a + b"})],
                 [ToolCall("s", "submit", {})]])
    rec = run_scripted(env, task, script, max_turns=len(COMMANDS) + 2)
    if rec.error or rec.reward != 1.0:
      raise RuntimeError(f"bench episode failed: {rec.error or rec.info}")
    return rec

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    list(pool.map(one, range(episodes)))
  return episodes / ((time.monotonic() - start) / 60.0)


def make_bench_task(root: str) -> dict:
  """A one-bug git repo (add uses -) with gold patch and test patch, as an SWE task."""
  repo = os.path.join(root, "calc")
  env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
             GIT_COMMITTER_EMAIL="b@b")

  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True, env=env).stdout

  os.makedirs(os.path.join(repo, "calc"))
  os.makedirs(os.path.join(repo, "tests"))
  _write(repo, "calc/__init__.py", "def add(a, b):\n    return a - b\n")
  _write(repo, "tests/test_calc.py", "from calc import add\n\n\ndef test_zero():\n"
         "    assert add(0, 0) == 0\n")
  git("init", "-q")
  git("add", "-A")
  git("commit", "-q", "-m", "base")
  base = git("rev-parse", "HEAD").strip()
  _write(repo, "tests/test_calc.py", "from calc import add\n\n\ndef test_zero():\n"
         "    assert add(0, 0) == 0\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
  test_patch = git("diff")
  git("checkout", "-q", "--", ".")
  return {"repo": "bench/calc", "repo_path": repo, "instance_id": "bench__calc-1",
          "base_commit": base, "problem_statement": "add is wrong", "test_patch": test_patch,
          "FAIL_TO_PASS": ["tests/test_calc.py::test_add"],
          "PASS_TO_PASS": ["tests/test_calc.py::test_zero"]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--episodes", type=int, default=8, help="episodes per measurement")
  args = parser.parse_args(argv)
  from katjax.sandbox.docker import docker_available
  result: dict = {}
  with tempfile.TemporaryDirectory() as root:
    task = make_bench_task(root)
    ok, why = docker_available()
    for backend in ("local", "docker"):
      if backend == "docker" and not ok:
        result["docker"], result["docker_skipped"] = None, why
        continue
      result[backend] = {str(c): round(episode_throughput(backend, task, c, args.episodes), 2)
                         for c in (1, 4)}
  print(json.dumps(result))
  return result


def _write(repo, path, text):
  with open(os.path.join(repo, path), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
