"""SWE-bench style grading: fresh sandbox, apply patch, reset tests, run the tests, parse.

`grade(task, patch, make_sandbox, repo_dir)` is usable on its own (gold-patch validation,
RFT rewards). Steps, each turning failure into `info["error"]` rather than an exception:
1. refuse a patch touching test files (the test_patch's files or test-looking paths);
2. copy the repo at `base_commit` into a fresh sandbox (or a clean one from a pool);
3. apply the patch: `git apply`, then a lenient `git apply`, then `patch --fuzz`;
4. reset the test_patch's files to `base_commit` and apply `test_patch`;
5. run the test command (from a script file, so thousands of ids fit) with ALL its output
   redirected to a log file inside the sandbox, between two random-nonce markers (so code
   under test cannot fake them), and record its exit status there too; the log file is then
   read back whole (up to `LOG_LIMIT`), never through the interactive output cap, so a
   suite of thousands of tests loses no result line;
6. parse the marked log with the task's log parser (`pytest` by default; `unittest`,
   `django`: katjax.envs.swe_parsers) and report every listed test's status; resolved iff
   every FAIL_TO_PASS and PASS_TO_PASS test passed AND the exit status is 0 (a printed fake
   "PASSED" line cannot flip a failing run).
The time limit is the task's `timeout` field, else the caller's `timeout`; a run that hits
it is unresolved with the reason, and the statuses logged before the kill are reported.
Memory is bounded by the sandbox (a cgroup / container limit, not an address-space rlimit).
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from typing import Callable

from katjax.envs.swe_diff import diff_files
from katjax.envs.swe_parsers import LOG_PARSERS, PASSING, parse_pytest_log, register_log_parser

__all__ = ["grade", "parse_pytest_log", "register_log_parser", "LOG_PARSERS", "diff_files",
           "is_test_path", "test_ids", "default_test_cmd", "TaskError", "checkout",
           "apply_patch", "run_logged", "LOG_LIMIT", "DEFAULT_TIMEOUT"]

LOG_LIMIT = 64 << 20  # bytes of test log read back; a larger log is an error, never cut
DEFAULT_TIMEOUT = 300.0  # seconds for the test command when neither task nor caller says


class TaskError(ValueError):
  """A task is malformed or its repository is missing."""


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


def is_test_path(path: str) -> bool:
  """Heuristic SWE-bench uses: test directories, test_*.py, *_test.py, conftest.py."""
  parts = path.split("/")
  name = parts[-1]
  return (any(p in ("test", "tests", "testing") for p in parts[:-1])
          or name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py")


def grade(task: dict, patch: str, make_sandbox: Callable, repo_dir: str,
          timeout: float | None = None) -> tuple[bool, dict]:
  """Grades `patch` on a fresh copy of the task's repo: (resolved, info).

  make_sandbox: a callable returning a context manager that yields a sandbox (a sandbox
  itself, closed on exit, or `SandboxPool.lease`, reset on exit). info has "tests" (every
  listed test's status, "MISSING" when the log does not name it), "exit_code", "error"
  (None or the reason it is unresolved), "f2p_passed", "p2p_passed", "log_bytes".
  """
  f2p, p2p = test_ids(task, "FAIL_TO_PASS"), test_ids(task, "PASS_TO_PASS")
  timeout = float(task.get("timeout") or timeout or DEFAULT_TIMEOUT)
  info: dict = {"instance_id": task.get("instance_id"), "error": None, "tests": {},
                "exit_code": None, "patch_applied": False, "timeout": timeout}
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
  with make_sandbox() as sb:
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
    run = run_logged(sb, task.get("test_cmd") or default_test_cmd(task), timeout)
  log, timed_out = run["log"], run["timed_out"]
  info.update((k, run[k]) for k in ("exit_code", "error", "log_bytes", "log_tail") if k in run)
  if log is None:
    return False, info
  statuses = parser(log)
  info["tests"] = {t: statuses.get(t, "MISSING") for t in f2p + p2p}
  info["f2p_passed"] = sum(info["tests"][t] in PASSING for t in f2p)
  info["p2p_passed"] = sum(info["tests"][t] in PASSING for t in p2p)
  if timed_out:
    info["error"] = f"test command timed out after {timeout:g}s"
    return False, info
  all_pass = all(info["tests"][t] in PASSING for t in f2p + p2p)
  is_pytest = task.get("log_parser", "pytest") == "pytest"
  if all_pass and is_pytest and not _pytest_footer_ok(log, f2p + p2p):
    # Code that prints fake PASSED lines and exits 0 before pytest finishes lacks the footer.
    info["error"] = "pytest session footer missing or counts fewer passes than claimed"
    all_pass = False
  if all_pass and info["exit_code"] != 0:
    info["error"] = f"log shows all tests passing but the test command exited {info['exit_code']}"
  if not all_pass and info["error"] is None:
    bad = [t for t in f2p + p2p if info["tests"][t] not in PASSING]
    first = f"{bad[0]} {info['tests'][bad[0]]}"
    info["error"] = f"{len(bad)} listed tests did not pass (first: {first})"
  return all_pass and info["exit_code"] == 0, info


def run_logged(sb, cmd: str, timeout: float) -> dict:
  """Runs `cmd` in `sb` with its whole output in a log file read back afterwards.

  Returns {"log": text between the markers or None, "exit_code", "timed_out", "error",
  "log_bytes", "log_tail"}: the log is never cut by the sandbox's interactive output cap.
  """
  res = {"log": None, "exit_code": None, "timed_out": False, "error": None}
  nonce = uuid.uuid4().hex
  start, end = f">>>>> START TEST OUTPUT {nonce}", f">>>>> END TEST OUTPUT {nonce}"
  script, log_path = f".git/katjax-test-{nonce}.sh", f".git/katjax-test-{nonce}.log"
  sb.write_file(script, f"{cmd}\n")
  out, code, res["timed_out"] = sb.exec(
    f"{{ echo {shlex.quote(start)}; bash {script}; rc=$?; echo; echo {shlex.quote(end)} $rc; }}"
    f" > {log_path} 2>&1", timeout=timeout)
  try:
    text = sb.read_file(log_path, max_bytes=LOG_LIMIT + 1)
  except FileNotFoundError:
    res["error"] = f"the test command left no log (exit {code}): {out[-500:]}"
    return res
  res["log_bytes"] = len(text.encode("utf-8", "replace"))
  if res["log_bytes"] > LOG_LIMIT:
    res["error"] = f"test log exceeds {LOG_LIMIT} bytes; not graded"
    return res
  begin = text.find(start + "\n")
  m = None
  for m in re.finditer(re.escape(end) + r" (\d+)$", text, flags=re.M):
    pass  # the last end marker: the real one follows everything the tests printed
  if begin < 0 or (m is None and not res["timed_out"]):
    res["error"] = ("test output markers not found (the test command did not run to "
                    f"completion; exit {code})")
    res["log_tail"] = text[-2000:]
    return res
  if m is None:  # timed out: what was logged before the kill still tells which tests ran
    res["log"] = text[begin + len(start) + 1:]
    return res
  res["exit_code"] = int(m.group(1))
  res["log"] = text[begin + len(start) + 1:m.start()]
  return res


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
