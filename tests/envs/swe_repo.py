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


MANY_BUGGY = "def value(i):\n    return 2 * i if i != 1234 else -1\n"
MANY_FIXED = "def value(i):\n    return 2 * i\n"
MANY_TESTS = ("import pytest\n\nfrom many import value\n\nN = {n}\n\n\n"
              "@pytest.mark.parametrize('i', range(N), "
              "ids=[f'case {{i}} [{{i % 7}}] - x' for i in range(N)])\n"
              "def test_value(i):\n    assert value(i) == 2 * i\n")


def many_id(i):
  """The pytest node id of case i, written out independently of pytest."""
  return f"tests/test_many.py::test_value[case {i} [{i % 7}] - x]"


def make_many_task(root, n=2000):
  """A task listing n tests (ids with spaces, brackets and " - "); only case 1234 fails."""
  repo = os.path.join(str(root), "many_repo")
  os.makedirs(repo)
  git(repo, "init", "-q", "-b", "main")
  write(repo, "many/__init__.py", MANY_BUGGY)
  write(repo, "tests/test_many.py", MANY_TESTS.format(n=n))
  git(repo, "add", "-A")
  git(repo, "commit", "-q", "-m", "buggy")
  base = git(repo, "rev-parse", "HEAD").strip()
  write(repo, "many/__init__.py", MANY_FIXED)
  gold = git(repo, "diff")
  git(repo, "checkout", "-q", "--", ".")
  return {"repo": "example/many", "repo_path": repo, "instance_id": "example__many-1",
          "base_commit": base, "problem_statement": "value(1234) is -1.", "patch": gold,
          "test_patch": "", "FAIL_TO_PASS": [many_id(1234)],
          "PASS_TO_PASS": [many_id(i) for i in range(n) if i != 1234]}
