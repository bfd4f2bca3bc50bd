"""Executable SWE tasks from real Python libraries' source distributions, offline.

A library's sdist (fetched once, at generation time only, with `pip download --no-deps
--no-binary :all: NAME==VERSION`) is trimmed to its sources and tests and stored as a
deterministic `.tar.xz` beside the task file. Tasks are made SWE-smith style:
1. run the library's suite in a sandbox (pytest `-rA`, whole log read back from a file);
2. for each candidate bug (`swe_mutate.mutations`: flipped operators and comparisons,
   off-by-one constants, dropped or negated branches, swapped call arguments; one site in
   a non-test module), run the suite again; keep the bug if some tests that passed now fail
   (FAIL_TO_PASS) while others still pass (PASS_TO_PASS, limited like SWE-bench to the test
   files that hold a failing test);
3. deduplicate: one task per (file, function, FAIL_TO_PASS set) and per gold patch;
4. write the problem statement from the failing tests (their ids and pytest's one-line
   failure messages; never the location of the bug); difficulty = files and changed lines
   of the gold patch (`swe_diff.diff_stats`).
The buggy tree is not stored: a task keeps `bug_patch` (pristine -> buggy) and its
`base_commit`, and `materialize` rebuilds the git repository from the tarball with fixed
author, committer and dates, so every commit id comes out the same on any machine (and a
mismatch is reported as a broken task).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading

from katjax.envs.swe_diff import diff_stats
from katjax.envs.swe_grade import TaskError, is_test_path, run_logged
from katjax.envs.swe_mutate import mutations
from katjax.envs.swe_parsers import parse_pytest_log

__all__ = ["pack_sdist", "build_tasks", "materialize", "load_tasks", "DATA_DIR"]

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "swe_tasks")
_KEEP_EXT = (".py", ".cfg", ".toml", ".ini", ".txt")
_SKIP_DIRS = ("docs", "doc", "examples", "benchmarks", "bench")
_LOCK = threading.Lock()
SUITE_CMD = "COLUMNS=160 python3 -m pytest -rA -p no:cacheprovider -q"


def pack_sdist(sdist: str, out_dir: str) -> str:
  """Trims an sdist (.tar.gz) to sources + tests and writes `<name>-<ver>.tar.xz`; its path."""
  base = os.path.basename(sdist)
  stem = base[:-len(".tar.gz")] if base.endswith(".tar.gz") else os.path.splitext(base)[0]
  out = os.path.join(out_dir, f"{stem}.tar.xz")
  members = []
  with tarfile.open(sdist) as src:
    for m in src.getmembers():
      parts = m.name.split("/")[1:]  # drop the top-level "<name>-<ver>/"
      rel = "/".join(parts)
      if not m.isfile() or not rel or any(p.endswith(".egg-info") for p in parts):
        continue
      if parts[0] in _SKIP_DIRS or not rel.endswith(_KEEP_EXT) or rel in ("setup.py",):
        continue
      members.append((rel, src.extractfile(m).read()))
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
    for rel, data in sorted(members):
      info = tarfile.TarInfo(rel)
      info.size, info.mode, info.mtime = len(data), 0o644, 0
      tar.addfile(info, io.BytesIO(data))
  import lzma
  with open(out, "wb") as f:
    f.write(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
  return out


def build_tasks(tarball: str, make_sandbox, max_tasks: int = 12, seed: int = 0,
                max_candidates: int = 60, timeout: float = 60.0) -> list[dict]:
  """SWE tasks from one packed library (see the module docstring), each graded as built."""
  name = os.path.basename(tarball)[:-len(".tar.xz")]
  with tempfile.TemporaryDirectory() as tmp:
    repo = _extract_repo(tarball, os.path.join(tmp, name))
    pristine = _git(repo, "rev-parse", "HEAD").strip()
    with make_sandbox() as sb:
      sb.upload_dir(repo)
      before, _ = _suite(sb, timeout)
      passing = {t for t, s in before.items() if s == "PASSED"}
      if not passing:
        raise ValueError(f"{name}: no passing tests; synthesis needs a green suite")
      candidates = []
      for f in _git(repo, "ls-files", "*.py").split():
        if is_test_path(f) or f.endswith(("setup.py", "conftest.py", "_version.py")):
          continue
        with open(os.path.join(repo, f)) as fh:
          src = fh.read()
        funcs = _function_spans(src)
        for kind, line, mutated in mutations(src):
          func = next((n for n, lo, hi in funcs if lo <= line <= hi), None)
          if func is not None:  # module-level constants break imports, not behaviour
            candidates.append((f, func, kind, line, mutated, src))
      random.Random(seed).shuffle(candidates)
      tasks, seen = [], set()
      for f, func, kind, line, mutated, src in candidates[:max_candidates]:
        if len(tasks) >= max_tasks:
          break
        sb.write_file(f, mutated)
        try:
          after, log = _suite(sb, timeout)
        finally:
          sb.write_file(f, src)
        f2p = sorted(t for t in passing if after.get(t) not in ("PASSED", None))
        f2p_files = {t.split("::")[0] for t in f2p}
        p2p = sorted(t for t in passing if after.get(t) == "PASSED"
                     and t.split("::")[0] in f2p_files)
        key = (f, func, tuple(f2p))
        if not f2p or not p2p or key in seen or len(f2p) > 50:
          continue
        seen.add(key)
        tasks.append(_task(repo, name, pristine, f, func, kind, line, mutated, f2p, p2p, log))
  return tasks


def materialize(tasks: list[dict], data_dir: str = DATA_DIR,
                cache_dir: str | None = None) -> list[dict]:
  """Rebuilds each task's repository (one git repo per tarball, one commit per task).

  Returns the tasks with `repo_path` set. TaskError when a task's tarball is missing, its
  bug_patch does not apply or the rebuilt commit differs from its base_commit.
  """
  cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "katjax-swe-repos")
  os.makedirs(cache_dir, exist_ok=True)
  # Commits are made in shared checkouts: one materialize at a time per cache directory,
  # across threads (the lock) and processes (flock).
  with _LOCK, open(os.path.join(cache_dir, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _materialize(tasks, data_dir, cache_dir)


def _materialize(tasks, data_dir, cache_dir):
  out = []
  for task in tasks:
    tar = task.get("repo_tarball")
    if not tar:
      out.append(task)  # a task with its own repository (repo_path / repo)
      continue
    tar_path = os.path.join(data_dir, tar)
    if not os.path.isfile(tar_path):
      raise TaskError(f"task {task.get('instance_id')!r}: repo tarball {tar_path} not found")
    repo = os.path.join(cache_dir, tar[:-len(".tar.xz")])
    if not os.path.isdir(os.path.join(repo, ".git")):
      tmp = repo + f".tmp{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      _extract_repo(tar_path, tmp)
      shutil.rmtree(repo, ignore_errors=True)  # a half-built leftover without .git
      os.rename(tmp, repo)
    base = task["base_commit"]
    if subprocess.run(["git", "-C", repo, "cat-file", "-e", f"{base}^{{commit}}"],
                      capture_output=True).returncode != 0:
      _commit_bug(repo, task)
    out.append({**task, "repo_path": repo})
  return out


def load_tasks(path: str) -> list[dict]:
  """Tasks from a JSONL file (or .jsonl.xz / .jsonl.gz); TaskError naming a bad line."""
  import gzip
  import lzma
  opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
  tasks = []
  with opener(path, "rt") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        task = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{i}: not JSON ({e})") from None
      if not isinstance(task, dict):
        raise TaskError(f"{path}:{i}: expected a JSON object, got {type(task).__name__}")
      tasks.append(task)
  return tasks


# -- helpers ---------------------------------------------------------------------------------

def _task(repo, name, pristine, f, func, kind, line, mutated, f2p, p2p, log) -> dict:
  path = os.path.join(repo, f)
  with open(path) as fh:
    src = fh.read()
  with open(path, "w") as fh:
    fh.write(mutated)
  bug_patch = _git(repo, "diff", "--no-color")
  _git(repo, "checkout", "-q", "--", f)
  digest = hashlib.sha1(bug_patch.encode()).hexdigest()[:8]
  task = {"repo": f"pypi/{name.rsplit('-', 1)[0]}", "instance_id": f"{name}__{digest}",
          "repo_tarball": f"{name}.tar.xz", "pristine_commit": pristine,
          "bug_patch": bug_patch, "test_patch": "", "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p,
          "problem_statement": _statement(name, f2p, log),
          "mutation": f"{kind} {f}:{line} in {func}()"}
  task["base_commit"] = _commit_bug(repo, task)
  task["patch"] = _git(repo, "diff", "--no-color", task["base_commit"], pristine)
  task["difficulty"] = diff_stats(task["patch"])
  _git(repo, "checkout", "-q", "-f", pristine)
  with open(path) as fh:
    assert fh.read() == src
  return task


def _statement(name: str, f2p: list[str], log: str) -> str:
  msgs = {}
  for line in log.splitlines():
    m = re.match(r"^(?:FAILED|ERROR) (\S+?)(?: - (.*))?$", line)
    if m and m.group(1) in f2p and m.group(2):
      msgs[m.group(1)] = m.group(2)[:200]
  shown = f2p[:5]
  lines = [f"After a recent change to {name.rsplit('-', 1)[0]}, these tests fail although "
           "they passed before (the tests are correct; the library code is not):", ""]
  lines += [f"- {t}" + (f": {msgs[t]}" if t in msgs else "") for t in shown]
  if len(f2p) > len(shown):
    lines.append(f"- ... and {len(f2p) - len(shown)} more")
  lines += ["", "Please find and fix the bug so that these tests pass again without breaking "
            "the others."]
  return "\n".join(lines)


def _suite(sb, timeout: float) -> tuple[dict[str, str], str]:
  run = run_logged(sb, SUITE_CMD, timeout)
  if run["log"] is None or run["timed_out"]:
    return {}, ""
  return parse_pytest_log(run["log"]), run["log"]


def _function_spans(src: str) -> list[tuple[str, int, int]]:
  out = []
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out.append((node.name, node.lineno, node.end_lineno))
  return sorted(out, key=lambda t: t[2] - t[1])  # innermost first


def _extract_repo(tarball: str, dest: str) -> str:
  os.makedirs(dest)
  with tarfile.open(tarball) as tar:
    tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
  _git(dest, "init", "-q", "-b", "main")
  _git(dest, "add", "-A")
  _git(dest, "commit", "-q", "-m", f"pristine {os.path.basename(tarball)}")
  return dest


def _commit_bug(repo: str, task: dict) -> str:
  """Commits task's bug_patch on top of the pristine commit (detached); the commit id."""
  head = _git(repo, "rev-parse", "HEAD").strip()
  pristine = task.get("pristine_commit") or head
  try:
    _git(repo, "checkout", "-q", "-f", "--detach", pristine)
    with tempfile.NamedTemporaryFile("w", suffix=".diff", delete=False) as f:
      f.write(task["bug_patch"])
    try:
      _git(repo, "apply", f.name)
    finally:
      os.unlink(f.name)
    _git(repo, "commit", "-q", "-am", f"task {task['instance_id']}")
    commit = _git(repo, "rev-parse", "HEAD").strip()
    _git(repo, "tag", "-f", f"task/{task['instance_id']}", commit)
  except RuntimeError as e:
    raise TaskError(f"task {task.get('instance_id')!r}: cannot rebuild its base commit: {e}") \
      from None
  finally:
    _git(repo, "checkout", "-q", "-f", "main")
  if task.get("base_commit") and commit != task["base_commit"]:
    raise TaskError(f"task {task['instance_id']!r}: rebuilt commit {commit} differs from "
                    f"base_commit {task['base_commit']}")
  return commit


def _git(repo, *args) -> str:
  env = dict(os.environ, GIT_AUTHOR_NAME="katjax", GIT_AUTHOR_EMAIL="katjax@localhost",
             GIT_COMMITTER_NAME="katjax", GIT_COMMITTER_EMAIL="katjax@localhost",
             GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z",
             GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
  r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {r.stderr.strip()}")
  return r.stdout
