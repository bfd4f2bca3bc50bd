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
  assert kinds == {"flip_operator", "off_by_one", "drop_branch", "negate_condition"}
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


def test_function_rewrites_swap_args_and_negate():
  src = "def f(a, b):\n    if a:\n        return g(a, b)\n    return 0\n"
  muts = {k: m for k, _, m in mutations(src)}
  assert muts["swap_args"] == src.replace("g(a, b)", "g(b, a)")
  assert muts["negate_condition"] == src.replace("if a:", "if not (a):")


# -- the shipped task set (katjax/envs/data/swe_tasks, made by its generate.sh) -------------

import os  # noqa: E402
import sys  # noqa: E402

from katjax.envs.swe_data import validate  # noqa: E402
from katjax.envs.swe_real import DATA_DIR, load_tasks, materialize  # noqa: E402
from katjax.sandbox.docker import docker_available  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
_ok, _why = docker_available()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
  tasks = load_tasks(os.path.join(DATA_DIR, "tasks.jsonl.xz"))
  return materialize(tasks, cache_dir=str(tmp_path_factory.mktemp("repos")))


def _changed_lines(patch):
  return sum(1 for line in patch.splitlines() if line[:1] in "+-"
             and not line.startswith(("+++ ", "--- ")))


def test_shipped_task_set_is_well_formed(shipped):
  size = sum(os.path.getsize(os.path.join(DATA_DIR, f)) for f in os.listdir(DATA_DIR))
  assert size < 400_000
  assert len(shipped) >= 30
  assert len({t["instance_id"] for t in shipped}) == len(shipped)
  assert {t["repo"] for t in shipped} == {"pypi/toolz", "pypi/more-itertools",
                                          "pypi/inflection"}
  keys = set()
  for t in shipped:
    # materialize rebuilt every base_commit exactly (it raises otherwise)
    assert os.path.isdir(os.path.join(t["repo_path"], ".git"))
    f2p, p2p = set(t["FAIL_TO_PASS"]), set(t["PASS_TO_PASS"])
    assert f2p and p2p and not f2p & p2p
    assert t["difficulty"] == {"files": 1, "lines": _changed_lines(t["patch"])}
    assert all(name in t["problem_statement"] for name in t["FAIL_TO_PASS"][:5])
    assert t["mutation"].split(":")[0].split(" ", 1)[1] not in t["problem_statement"]
    keys.add((t["mutation"].split(" in ")[-1], tuple(sorted(f2p))))
  assert len(keys) == len(shipped)  # deduplicated


def _smallest(tasks, k):
  return sorted(tasks, key=lambda t: len(t["FAIL_TO_PASS"]) + len(t["PASS_TO_PASS"]))[:k]


@pytest.mark.parametrize("backend", ["local", pytest.param("docker", marks=[
  pytest.mark.docker] + ([] if _ok else [pytest.mark.skip(reason=f"Docker unavailable: {_why}")]))])
def test_shipped_tasks_gold_resolves_empty_does_not(shipped, backend):
  tasks = _smallest([t for t in shipped if t["repo"] == "pypi/toolz"], 1)
  summary = validate(tasks, backend, jobs=1, log=lambda line: None)
  assert summary["broken"] == [] and summary["gold_resolved"] == 1.0
  assert summary["empty_resolved"] == 0.0


def test_agent_episode_on_a_shipped_task(shipped):
  from katjax.envs import ToolCall
  from katjax.testing.scripted import run_scripted
  task = _smallest(shipped, 1)[0]
  env = make_env("swe", backend="local", test_timeout=120)
  calls = iter([[ToolCall("1", "edit", {"path": "gold.patch", "old_str": "",
                                        "new_str": task["patch"]})],
                [ToolCall("2", "bash", {"command": "git apply gold.patch && rm gold.patch"})],
                [ToolCall("3", "submit", {})]])
  rec = run_scripted(env, task, list(calls))
  assert rec.error is None and rec.reward == 1.0, rec.info
