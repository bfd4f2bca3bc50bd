"""SWE-bench style grading: fresh sandbox, apply patch, reset tests, run between markers, parse.

`grade(task, patch, make_sandbox)` is usable on its own (gold-patch validation, RFT
rewards). Steps, each turning failure into `info["error"]` rather than an exception:
1. refuse a patch touching test files (the test_patch's files or test-looking paths);
2. copy the repo at `base_commit` into a fresh sandbox;
3. apply the patch: `git apply`, then a lenient `git apply`, then `patch --fuzz`;
4. reset the test_patch's files to `base_commit` and apply `test_patch`;
5. run the test command between two random-nonce markers (so code under test cannot
   fake them) and record its exit status;
6. parse the marked log with the task's log parser (default `pytest`, `-rA` summary);
   resolved iff every FAIL_TO_PASS and PASS_TO_PASS test passed AND the exit status is 0
   (a printed fake "PASSED" line cannot flip a failing run).
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from typing import Callable

__all__ = ["grade", "parse_pytest_log", "register_log_parser", "LOG_PARSERS", "diff_files",
           "is_test_path", "test_ids", "default_test_cmd", "TaskError"]


class TaskError(ValueError):
  """A task is malformed or its repository is missing."""


LOG_PARSERS: dict[str, Callable[[str], dict[str, str]]] = {}

_PASS = {"PASSED", "XFAIL"}
_FAIL_RANK = {"PASSED": 0, "XFAIL": 0, "SKIPPED": 1, "XPASS": 2, "FAILED": 3, "ERROR": 3}


def register_log_parser(name: str):
  """Decorator adding `fn(log) -> {test_id: status}` to the parser registry."""
  def decorate(fn):
    LOG_PARSERS[name] = fn
    return fn
  return decorate


@register_log_parser("pytest")
def parse_pytest_log(log: str) -> dict[str, str]:
  """Statuses from pytest `-rA` summary lines ("PASSED id", "FAILED id - msg").

  Pessimistic merge: a test seen with several statuses keeps the worst, so an extra
  printed "PASSED x" never hides a real "FAILED x".
  """
  out: dict[str, str] = {}
  for line in log.splitlines():
    m = re.match(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line.strip())
    if not m:
      continue
    status, test = m.groups()
    if _FAIL_RANK[status] >= _FAIL_RANK.get(out.get(test, "PASSED"), 0) or test not in out:
      out[test] = status
  return out


def test_ids(task: dict, key: str) -> list[str]:
  """FAIL_TO_PASS / PASS_TO_PASS as a list (SWE-bench stores them as JSON strings)."""
  value = task.get(key, [])
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      raise TaskError(f"task {task.get('instance_id')!r}: {key} is not a JSON list") from None
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise TaskError(f"task {task.get('instance_id')!r}: {key} must be a list of test ids")
  return value


def default_test_cmd(task: dict) -> str:
  """`python3 -m pytest -rA` over exactly the FAIL_TO_PASS + PASS_TO_PASS node ids."""
  ids = test_ids(task, "FAIL_TO_PASS") + test_ids(task, "PASS_TO_PASS")
  return ("python3 -m pytest -rA -p no:cacheprovider "
          + " ".join(shlex.quote(t) for t in ids))


def diff_files(patch: str) -> list[str]:
  """Paths a unified diff touches (b/ side; a/ side for deletions)."""
  files = []
  for m in re.finditer(r"^diff --git a/(\S+) b/(\S+)$", patch, flags=re.M):
    files.append(m.group(2))
  if not files:  # plain `diff -u` output without git headers
    for m in re.finditer(r"^\+\+\+ (?:b/)?(\S+)", patch, flags=re.M):
      if m.group(1) != "/dev/null":
        files.append(m.group(1))
  return list(dict.fromkeys(files))


def is_test_path(path: str) -> bool:
  """Heuristic SWE-bench uses: test directories, test_*.py, *_test.py, conftest.py."""
  parts = path.split("/")
  name = parts[-1]
  return (any(p in ("test", "tests", "testing") for p in parts[:-1])
          or name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py")


def grade(task: dict, patch: str, make_sandbox: Callable, repo_dir: str,
          timeout: float = 300.0) -> tuple[bool, dict]:
  """Grades `patch` on a fresh copy of the task's repo: (resolved, info)."""
  f2p, p2p = test_ids(task, "FAIL_TO_PASS"), test_ids(task, "PASS_TO_PASS")
  info: dict = {"instance_id": task.get("instance_id"), "error": None, "tests": {},
                "exit_code": None, "patch_applied": False}
  test_patch = task.get("test_patch") or ""
  protected = set(diff_files(test_patch))
  touched = diff_files(patch or "")
  bad = [f for f in touched if f in protected or is_test_path(f)]
  if bad:
    info["error"] = f"patch modifies test files {bad}; rejected"
    return False, info
  parser = LOG_PARSERS.get(task.get("log_parser", "pytest"))
  if parser is None:
    info["error"] = f"unknown log parser {task.get('log_parser')!r}; known: {sorted(LOG_PARSERS)}"
    return False, info
  sb = make_sandbox()
  try:
    err = checkout(sb, repo_dir, task["base_commit"])
    if err:
      info["error"] = err
      return False, info
    if patch and patch.strip():
      err = apply_patch(sb, patch, "model.patch")
      if err:
        info["error"] = f"patch does not apply: {err}"
        return False, info
    info["patch_applied"] = True
    if protected:
      files = " ".join(shlex.quote(f) for f in sorted(protected))
      # Files new in test_patch do not exist at base_commit: remove them instead.
      sb.exec(f"for f in {files}; do git checkout -q {shlex.quote(task['base_commit'])} -- \"$f\" "
              f"2>/dev/null || rm -f \"$f\"; done", timeout=60)
    if test_patch.strip():
      err = apply_patch(sb, test_patch, "test.patch")
      if err:
        info["error"] = f"test_patch does not apply: {err}"
        return False, info
    nonce = uuid.uuid4().hex
    start, end = f">>>>> START TEST OUTPUT {nonce}", f">>>>> END TEST OUTPUT {nonce}"
    cmd = task.get("test_cmd") or default_test_cmd(task)
    out, code, timed_out = sb.exec(
      f"echo {shlex.quote(start)}; ( {cmd} ) 2>&1; rc=$?; echo; echo {shlex.quote(end)} $rc",
      timeout=timeout)
  finally:
    sb.close()
  if timed_out:
    info["error"] = f"test command timed out after {timeout}s"
    return False, info
  m = re.search(re.escape(start) + r"\n(.*)\n" + re.escape(end) + r" (\d+)", out, flags=re.S)
  if not m:
    info["error"] = "test output markers not found (the test command did not run to completion)"
    info["log_tail"] = out[-2000:]
    return False, info
  log, info["exit_code"] = m.group(1), int(m.group(2))
  statuses = parser(log)
  info["tests"] = {t: statuses.get(t, "MISSING") for t in f2p + p2p}
  all_pass = all(info["tests"][t] in _PASS for t in f2p + p2p)
  is_pytest = task.get("log_parser", "pytest") == "pytest"
  if all_pass and is_pytest and not _pytest_footer_ok(log, f2p + p2p):
    # Code that prints fake PASSED lines and exits 0 before pytest finishes lacks the footer.
    info["error"] = "pytest session footer missing or counts fewer passes than claimed"
    all_pass = False
  if all_pass and info["exit_code"] != 0:
    info["error"] = f"log shows all tests passing but the test command exited {info['exit_code']}"
  info["f2p_passed"] = sum(info["tests"][t] in _PASS for t in f2p)
  info["p2p_passed"] = sum(info["tests"][t] in _PASS for t in p2p)
  return all_pass and info["exit_code"] == 0, info


def _pytest_footer_ok(log: str, ids: list[str]) -> bool:
  m = None
  for m in re.finditer(r"^=+ (.*?) in [\d.]+s(?: \([^)]*\))? =+$", log, flags=re.M):
    pass
  if m is None:
    return False
  passed = sum(int(n) for n, kind in re.findall(r"(\d+) (passed|xfailed)", m.group(1)))
  return passed >= len(set(ids))


def checkout(sb, repo_dir: str, commit: str) -> str | None:
  """Uploads the repo and checks out `commit` cleanly; an error message or None."""
  sb.upload_dir(repo_dir)
  out, code, _ = sb.exec(f"git -c advice.detachedHead=false checkout -q -f {shlex.quote(commit)}"
                         " && git clean -fdxq", timeout=120)
  if code != 0:
    return f"cannot check out base_commit {commit!r}: {out.strip()[-500:]}"
  return None


def apply_patch(sb, patch: str, name: str) -> str | None:
  """git apply, then a lenient git apply, then patch --fuzz; an error message or None.

  Every attempt is atomic (git apply checks before writing, patch runs --dry-run first), so
  a failed attempt leaves the tree as it was.
  """
  if not patch.endswith("\n"):
    patch += "\n"
  path = f".git/katjax-{name}"  # inside .git: invisible to git status and to the tests
  sb.write_file(path, patch)
  tries = [f"git apply --whitespace=nowarn {path}",
           f"git apply --whitespace=nowarn --recount --ignore-whitespace -C1 {path}",
           f"patch --batch --fuzz=5 -p1 --dry-run -i {path} >/dev/null && "
           f"patch --batch --fuzz=5 -p1 --no-backup-if-mismatch -i {path}"]
  last = ""
  for cmd in tries:
    out, code, _ = sb.exec(cmd, timeout=60)
    if code == 0:
      return None
    last = out.strip() or last
  return last[-500:] or "rejected by git apply and patch"
