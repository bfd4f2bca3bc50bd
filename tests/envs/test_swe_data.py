"""SWE data: curation filters over fake dumps; synthesis from the package's mini repo."""

import pytest

from katjax.envs import make_env
from katjax.envs.swe_data import MINI_REPO, curate, mutations, seed_tasks, split_diff

SRC = ("diff --git a/pkg/mod.py b/pkg/mod.py\n--- a/pkg/mod.py\n+++ b/pkg/mod.py\n"
       "@@ -1 +1 @@\n-a\n+b\n")
TST = ("diff --git a/tests/test_mod.py b/tests/test_mod.py\n--- a/tests/test_mod.py\n"
       "+++ b/tests/test_mod.py\n@@ -1 +1 @@\n-c\n+d\n")


def test_curate_filters():
  repos = [{"full_name": "big/repo", "stargazers_count": 500},
           {"full_name": "tiny/repo", "stargazers_count": 3}]
  issues = [{"repo": "big/repo", "number": 7, "title": "Crash", "body": "x" * 80},
            {"repo": "big/repo", "number": 8, "title": "Vague", "body": "broken"},
            {"repo": "tiny/repo", "number": 1, "title": "Crash", "body": "y" * 80}]
  base = {"repo": "big/repo", "merged": True, "comments": 2, "base_sha": "abc", "diff": SRC + TST}
  pulls = [
    {**base, "number": 1, "title": "Fix crash", "body": "Fixes #7"},        # kept
    {**base, "number": 2, "title": "Fix", "body": "closes #8"},             # low-quality issue
    {**base, "number": 3, "title": "Fix", "body": "no link"},               # no issue
    {**base, "number": 4, "body": "fixes #7", "diff": SRC},                 # no test change
    {**base, "number": 5, "body": "fixes #7", "merged": False},             # not merged
    {**base, "number": 6, "body": "fixes #7", "comments": 0},               # no activity
    {**base, "number": 7, "body": "fixes #1", "repo": "tiny/repo"},         # few stars
  ]
  tasks = curate(repos, pulls, issues)
  assert [t["instance_id"] for t in tasks] == ["big__repo-1"]
  assert tasks[0]["patch"] == SRC and tasks[0]["test_patch"] == TST
  assert tasks[0]["problem_statement"].startswith("Crash\n")


def test_split_diff():
  assert split_diff(TST + SRC) == (SRC, TST)


def test_mutations_are_single_site():
  src = MINI_REPO["minilib/__init__.py"]
  muts = mutations(src)
  kinds = {k for k, _, _ in muts}
  assert kinds == {"flip_operator", "off_by_one", "drop_branch"}
  for _, line, mutated in muts:
    a, b = src.splitlines(), mutated.splitlines()
    assert len(a) == len(b)
    assert [i + 1 for i in range(len(a)) if a[i] != b[i]] == [line]
    compile(mutated, "m", "exec")


@pytest.mark.slow
def test_seed_tasks_are_valid(tmp_path):
  tasks = seed_tasks(str(tmp_path), max_tasks=2, seed=0)
  assert len(tasks) == 2
  env = make_env("swe", backend="local", test_timeout=60)
  for task in tasks:
    assert task["FAIL_TO_PASS"] and task["PASS_TO_PASS"]
    assert not set(task["FAIL_TO_PASS"]) & set(task["PASS_TO_PASS"])
    env.reset(task)
    assert env.grade(task["patch"])[0] == 1.0
    assert env.grade("")[0] == 0.0
  env.close()
