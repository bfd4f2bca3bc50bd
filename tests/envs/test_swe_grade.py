"""Grading that loses no result: a 2,000-test task on both sandboxes; bad tasks reported
with their reason by the validate command (missing repo, test_patch that does not apply,
hanging test command, gold patch touching tests)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import swe_repo  # noqa: E402

from katjax.envs.swe_data import validate  # noqa: E402
from katjax.envs.swe_grade import grade  # noqa: E402
from katjax.sandbox.base import DEFAULT_OUTPUT_LIMIT  # noqa: E402
from katjax.sandbox.docker import docker_available  # noqa: E402
from katjax.sandbox.pool import SandboxPool  # noqa: E402

_ok, _why = docker_available()
BACKENDS = [pytest.param("local"), pytest.param("docker", marks=[pytest.mark.docker] + (
  [] if _ok else [pytest.mark.skip(reason=f"Docker sandbox unavailable: {_why}")]))]
N = 2000


@pytest.fixture(scope="module")
def many_task(tmp_path_factory):
  task = swe_repo.make_many_task(tmp_path_factory.mktemp("many"), n=N)
  # SWE-bench style: run the test file; the listed ids are looked up in its log.
  return {**task, "test_cmd": "python3 -m pytest -rA -p no:cacheprovider tests/test_many.py"}


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request):
  with SandboxPool(request.param, size=1) as p:
    yield p


def test_2000_listed_tests_gold_resolved_empty_not(pool, many_task):
  listed = many_task["FAIL_TO_PASS"] + many_task["PASS_TO_PASS"]
  assert len(listed) == N
  resolved, info = grade(many_task, many_task["patch"], pool.lease, many_task["repo_path"])
  assert resolved, info["error"]
  assert info["tests"] == {t: "PASSED" for t in listed}
  assert info["log_bytes"] > 3 * DEFAULT_OUTPUT_LIMIT  # more than the interactive cap keeps
  resolved, info = grade(many_task, "", pool.lease, many_task["repo_path"])
  assert not resolved
  assert info["tests"][swe_repo.many_id(1234)] == "FAILED"
  assert (info["f2p_passed"], info["p2p_passed"]) == (0, N - 1)
  assert "did not pass" in info["error"] and swe_repo.many_id(1234) in info["error"]
  assert pool.stats["created"] == 1  # both grades ran in one warm, reset sandbox


def test_validate_reports_each_bad_task_with_its_reason(tmp_path):
  good = swe_repo.make_task(tmp_path)
  bad_test_patch = ("diff --git a/tests/test_calc.py b/tests/test_calc.py\n"
                    "--- a/tests/test_calc.py\n+++ b/tests/test_calc.py\n"
                    "@@ -1,2 +1,2 @@\n-not in the file\n+x\n")
  tasks = [
    good,
    {**good, "instance_id": "gone", "repo_path": str(tmp_path / "nowhere"), "repo": "x/gone"},
    {**good, "instance_id": "bad-test-patch", "test_patch": bad_test_patch},
    {**good, "instance_id": "hangs", "test_cmd": "echo started; sleep 600", "timeout": 2},
    {**good, "instance_id": "gold-edits-tests", "patch": good["test_patch"]},
  ]
  lines = []
  summary = validate(tasks, "local", jobs=2, log=lines.append)
  reasons = {b["instance_id"]: b["reason"] for b in summary["broken"]}
  assert set(reasons) == {"gone", "bad-test-patch", "hangs", "gold-edits-tests"}
  assert "repository for task 'gone' not found" in reasons["gone"]
  assert "test_patch does not apply" in reasons["bad-test-patch"]
  assert "timed out after 2s" in reasons["hangs"]
  assert "modifies test files ['tests/test_calc.py']; rejected" in reasons["gold-edits-tests"]
  assert summary["tasks"] == 5 and summary["gold_resolved"] == 0.2
  assert summary["empty_resolved"] == 0.0
  assert len(lines) == 5 and "example__calc-1: gold=resolved empty=unresolved" in lines
