"""A tiny git repository with a bug, its gold patch and test patch (built by the tests)."""

import os
import subprocess

BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
OLD_TESTS = "from calc import mul\n\n\ndef test_mul():\n    assert mul(3, 4) == 12\n"
NEW_TESTS = OLD_TESTS.replace("import mul", "import add, mul") + (
  "\n\ndef test_add():\n    assert add(2, 3) == 5\n")


def git(repo, *args):
  env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t", GIT_AUTHOR_DATE="2020-01-01T00:00:00Z",
             GIT_COMMITTER_DATE="2020-01-01T00:00:00Z")
  return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                        text=True, env=env).stdout


def write(repo, path, text):
  full = os.path.join(repo, path)
  os.makedirs(os.path.dirname(full), exist_ok=True)
  with open(full, "w") as f:
    f.write(text)


def make_task(root):
  """Builds repo `root/calc_repo` and returns its SWE-bench style task dict."""
  repo = os.path.join(str(root), "calc_repo")
  os.makedirs(repo)
  git(repo, "init", "-q", "-b", "main")
  write(repo, "calc/__init__.py", BUGGY)
  write(repo, "tests/test_calc.py", OLD_TESTS)
  git(repo, "add", "-A")
  git(repo, "commit", "-q", "-m", "buggy")
  base = git(repo, "rev-parse", "HEAD").strip()
  write(repo, "calc/__init__.py", FIXED)
  gold = git(repo, "diff")
  git(repo, "checkout", "-q", "--", ".")
  write(repo, "tests/test_calc.py", NEW_TESTS)
  test_patch = git(repo, "diff")
  git(repo, "checkout", "-q", "--", ".")
  return {"repo": "example/calc", "repo_path": repo, "instance_id": "example__calc-1",
          "base_commit": base, "problem_statement": "add(2, 3) returns -1 instead of 5.",
          "patch": gold, "test_patch": test_patch,
          "FAIL_TO_PASS": ["tests/test_calc.py::test_add"],
          "PASS_TO_PASS": '["tests/test_calc.py::test_mul"]'}
