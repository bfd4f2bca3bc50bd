"""SWE task data: curation from local GitHub dumps, and SWE-smith style bug synthesis.

(a) `curate(repos, pulls, issues)`: keep merged PRs of well-starred repos that resolve an
    issue ("fixes #N") of sufficient quality and change both tests and source; the PR diff
    is split into `patch` (source) and `test_patch` (tests). FAIL_TO_PASS / PASS_TO_PASS are
    left empty: they come from running the tests (`validate` in a sandbox), not from metadata.
(b) `synthesize(repo_dir, ...)`: mutate one function of a Python repo with tests (flip an
    operator, drop or negate a branch, off-by-one, swap call arguments), keep the mutation
    if some tests pass before and fail after (FAIL_TO_PASS) while others pass in both
    (PASS_TO_PASS); the buggy tree is committed as base_commit, the gold patch is the
    reverse diff, the issue text is written from the failing tests. `seed_tasks(root)` does this for the package's own mini repo;
    `katjax.envs.swe_real` does it for real libraries' source distributions.
(c) `python -m katjax.envs.swe_data validate TASKS.jsonl --sandbox=local|docker` grades every
    task with its gold patch and with no patch and reports the broken ones (`validate`);
    `... build SDIST.tar.gz ... --out DIR` makes a task set (`swe_real`).
"""

from __future__ import annotations

import ast
import os
import random
import re
import shlex
import subprocess

from katjax.envs.swe_diff import diff_files
from katjax.envs.swe_grade import is_test_path
from katjax.envs.swe_mutate import mutations
from katjax.envs.swe_parsers import parse_pytest_log

__all__ = ["curate", "split_diff", "synthesize", "mutations", "seed_tasks", "MINI_REPO"]

_LINK = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s+#(\d+)", re.I)


def curate(repos: list[dict], pulls: list[dict], issues: list[dict], min_stars: int = 100,
           min_pr_activity: int = 1, min_issue_chars: int = 40) -> list[dict]:
  """Task candidates from dumps of repos {full_name, stargazers_count}, PRs {repo, number,
  title, body, merged, base_sha, diff, comments, review_comments} and issues {repo, number,
  title, body, is_pull_request?}."""
  stars = {r["full_name"]: int(r.get("stargazers_count", 0)) for r in repos}
  issue_by = {(i["repo"], int(i["number"])): i for i in issues if not i.get("is_pull_request")}
  out = []
  for pr in pulls:
    repo = pr.get("repo")
    if stars.get(repo, 0) < min_stars or not pr.get("merged"):
      continue
    if int(pr.get("comments", 0)) + int(pr.get("review_comments", 0)) < min_pr_activity:
      continue
    linked = [issue_by.get((repo, int(n))) for n in _LINK.findall(
      f"{pr.get('title', '')}\n{pr.get('body') or ''}")]
    linked = [i for i in linked if i and len((i.get("body") or "").strip()) >= min_issue_chars]
    if not linked:
      continue
    patch, test_patch = split_diff(pr.get("diff", ""))
    if not patch or not test_patch:
      continue
    out.append({
      "repo": repo, "instance_id": f"{repo.replace('/', '__')}-{pr['number']}",
      "base_commit": pr.get("base_sha", ""), "patch": patch, "test_patch": test_patch,
      "problem_statement": "\n\n".join(f"{i['title']}\n{i['body'].strip()}" for i in linked),
      "FAIL_TO_PASS": [], "PASS_TO_PASS": [], "created_at": pr.get("created_at")})
  return out


def split_diff(diff: str) -> tuple[str, str]:
  """(source part, test part) of a git diff, split per file by `is_test_path`."""
  chunks = re.split(r"(?m)^(?=diff --git )", diff)
  src, tests = [], []
  for chunk in chunks:
    files = diff_files(chunk)
    if files:
      (tests if is_test_path(files[0]) else src).append(chunk)
  return "".join(src), "".join(tests)


def synthesize(repo_dir: str, max_tasks: int = 5, seed: int = 0, make_sandbox=None,
               timeout: float = 60.0) -> list[dict]:
  """Bug tasks from one-site mutations of a git repo's non-test .py files (see module doc).

  Each kept task's buggy tree is committed on a detached HEAD (base_commit) in `repo_dir`;
  the repo is left checked out at its original commit.
  """
  if make_sandbox is None:
    from katjax.sandbox import make_sandbox as _make
    make_sandbox = lambda: _make("local")  # noqa: E731
  orig = _git(repo_dir, "rev-parse", "HEAD").strip()
  files = [f for f in _git(repo_dir, "ls-files", "*.py").split() if not is_test_path(f)]
  before = _run_tests(repo_dir, make_sandbox, timeout)
  passing = sorted(t for t, s in before.items() if s == "PASSED")
  if not passing:
    raise ValueError(f"no passing tests in {repo_dir}: synthesis needs a green test suite")
  candidates = []
  for f in files:
    with open(os.path.join(repo_dir, f)) as fh:
      src = fh.read()
    candidates += [(f, kind, line, mutated) for kind, line, mutated in mutations(src)]
  random.Random(seed).shuffle(candidates)
  tasks = []
  for f, kind, line, mutated in candidates:
    if len(tasks) >= max_tasks:
      break
    path = os.path.join(repo_dir, f)
    with open(path) as fh:
      original = fh.read()
    with open(path, "w") as fh:
      fh.write(mutated)
    try:
      after = _run_tests(repo_dir, make_sandbox, timeout)
      f2p = [t for t in passing if after.get(t) != "PASSED"]
      p2p = [t for t in passing if after.get(t) == "PASSED"]
      if f2p and p2p:
        _git(repo_dir, "checkout", "-q", "--detach")
        _git(repo_dir, "commit", "-q", "-am", f"synthetic bug: {kind} in {f}:{line}")
        base = _git(repo_dir, "rev-parse", "HEAD").strip()
        gold = _git(repo_dir, "diff", base, orig, "--", f)
        tasks.append({
          "repo": os.path.basename(os.path.abspath(repo_dir)),
          "repo_path": os.path.abspath(repo_dir),
          "instance_id": f"synth-{seed}-{len(tasks)}", "base_commit": base, "patch": gold,
          "test_patch": "", "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p,
          "problem_statement": _issue_text(f2p, after), "mutation": f"{kind} {f}:{line}"})
    finally:
      _git(repo_dir, "checkout", "-q", "-f", orig)
  return tasks


def seed_tasks(root: str, max_tasks: int = 4, seed: int = 0, make_sandbox=None) -> list[dict]:
  """Materialises the package's mini repo under `root` and synthesises tasks from it."""
  repo = os.path.join(root, "minirepo")
  for path, text in MINI_REPO.items():
    full = os.path.join(repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "w") as f:
      f.write(text)
  _git(repo, "init", "-q")
  _git(repo, "add", "-A")
  _git(repo, "commit", "-q", "-m", "minirepo")
  return synthesize(repo, max_tasks=max_tasks, seed=seed, make_sandbox=make_sandbox)


def _run_tests(repo_dir, make_sandbox, timeout) -> dict[str, str]:
  sb = make_sandbox()
  try:
    sb.upload_dir(repo_dir)
    out, _, timed_out = sb.exec("python3 -m pytest -rA -p no:cacheprovider 2>&1", timeout=timeout)
  finally:
    sb.close()
  return {} if timed_out else parse_pytest_log(out)


def _issue_text(f2p: list[str], after: dict) -> str:
  names = ", ".join(shlex.quote(t) for t in f2p[:5])
  more = f" (and {len(f2p) - 5} more)" if len(f2p) > 5 else ""
  return (f"After a recent change these tests fail: {names}{more}. They passed before and "
          "the tests are correct; please find and fix the bug in the library code.")


def _git(repo, *args) -> str:
  env = dict(os.environ, GIT_AUTHOR_NAME="katjax", GIT_AUTHOR_EMAIL="katjax@localhost",
             GIT_COMMITTER_NAME="katjax", GIT_COMMITTER_EMAIL="katjax@localhost",
             GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
  r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {r.stderr.strip()}")
  return r.stdout


MINI_REPO = {
  "minilib/__init__.py": '''"""A little library the package synthesises bug-fix tasks from."""


def clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x


def mean(xs):
    return sum(xs) / len(xs)


def count_words(text):
    return len([w for w in text.split() if w])


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
''',
  "tests/test_minilib.py": '''from minilib import clamp, count_words, fib, mean


def test_clamp_low():
    assert clamp(-5, 0, 10) == 0


def test_clamp_high():
    assert clamp(50, 0, 10) == 10


def test_clamp_inside():
    assert clamp(3, 0, 10) == 3


def test_mean():
    assert mean([1, 2, 3, 6]) == 3


def test_count_words():
    assert count_words("a bb  ccc") == 3


def test_fib():
    assert [fib(i) for i in range(7)] == [0, 1, 1, 2, 3, 5, 8]
''',
}


# -- command line ----------------------------------------------------------------------------

def validate(tasks: list[dict], backend: str = "local", jobs: int = 2, timeout: float = 300.0,
             data_dir: str | None = None, log=print) -> dict:
  """Grades every task with its gold patch and with no patch (see `main`); a summary dict.

  A task is broken when its gold patch is not resolved or the empty patch is (or it cannot
  be set up at all: missing repository, unappliable patch, gold patch touching tests).
  """
  import concurrent.futures
  from katjax.envs.swe import resolve_repo
  from katjax.envs.swe_grade import TaskError, grade
  from katjax.envs.swe_real import DATA_DIR, materialize
  from katjax.sandbox.pool import SandboxPool

  def one(task):
    row = {"instance_id": getattr(task, "instance_id", None) if isinstance(task, Exception)
           else task.get("instance_id"), "gold": False, "empty": False, "reason": None}
    try:
      if isinstance(task, Exception):
        raise task
      repo = resolve_repo(task)
      for key, patch in (("gold", task.get("patch") or ""), ("empty", "")):
        row[key], info = grade(task, patch, pool.lease, repo, timeout=timeout)
        if key == "gold" and not row[key]:
          row["reason"] = f"gold not resolved: {info['error']}"
      if row["empty"]:
        row["reason"] = "the empty patch is graded resolved"
    except (TaskError, KeyError) as e:
      row["reason"] = f"{type(e).__name__}: {e}"
    log(f"{row['instance_id']}: gold={'resolved' if row['gold'] else 'UNRESOLVED'} "
        f"empty={'RESOLVED' if row['empty'] else 'unresolved'}"
        + (f"  ({row['reason']})" if row["reason"] else ""))
    return row

  def prepare(task):  # the repositories first, one at a time (they are git checkouts)
    try:
      return materialize([task], data_dir or DATA_DIR)[0]
    except TaskError as e:
      e.instance_id = task.get("instance_id")
      return e

  tasks = [prepare(t) for t in tasks]
  with SandboxPool(backend, size=jobs) as pool, \
      concurrent.futures.ThreadPoolExecutor(jobs) as ex:
    rows = list(ex.map(one, tasks))
  n = len(rows)
  broken = [r for r in rows if r["reason"] or not r["gold"] or r["empty"]]
  return {"tasks": n, "backend": backend,
          "gold_resolved": sum(r["gold"] for r in rows) / max(n, 1),
          "empty_resolved": sum(r["empty"] for r in rows) / max(n, 1),
          "broken": [{"instance_id": r["instance_id"], "reason": r["reason"] or
                      ("gold not resolved" if not r["gold"] else "empty patch resolved")}
                     for r in broken]}


def main(argv=None) -> int:
  """`python -m katjax.envs.swe_data {validate,build} ...`; see --help."""
  import argparse
  import json
  parser = argparse.ArgumentParser(prog="python -m katjax.envs.swe_data",
                                   description="SWE task validation and synthesis.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  v = sub.add_parser("validate", help="grade every task with its gold patch and no patch; "
                     "report tasks where gold is not resolved or no-patch is")
  v.add_argument("tasks", help="JSONL file of SWE tasks")
  v.add_argument("--sandbox", choices=("local", "docker"), default="local")
  v.add_argument("--jobs", type=int, default=2, help="tasks graded at once (sandbox pool size)")
  v.add_argument("--timeout", type=float, default=300.0, help="seconds per test run "
                 "(a task's own `timeout` field wins)")
  v.add_argument("--limit", type=int, default=0, help="only the first N tasks")
  b = sub.add_parser("build", help="synthesise tasks from sdists (pip download --no-binary)")
  b.add_argument("sdists", nargs="+", help="<name>-<version>.tar.gz source distributions")
  b.add_argument("--out", required=True, help="directory for the tarballs and tasks.jsonl")
  b.add_argument("--max-tasks", type=int, default=12, help="tasks per library")
  b.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.cmd == "validate":
    from katjax.envs.swe_real import load_tasks
    tasks = load_tasks(args.tasks)
    tasks = tasks[:args.limit] if args.limit else tasks
    summary = validate(tasks, args.sandbox, args.jobs, args.timeout,
                       data_dir=os.path.dirname(os.path.abspath(args.tasks)))
    print(json.dumps(summary))
    return 1 if summary["broken"] else 0
  from katjax.envs.swe_real import build_tasks, pack_sdist
  from katjax.sandbox import make_sandbox
  os.makedirs(args.out, exist_ok=True)
  tasks = []
  for sdist in args.sdists:
    tar = pack_sdist(sdist, args.out)
    made = build_tasks(tar, lambda: make_sandbox("local"), max_tasks=args.max_tasks,
                       seed=args.seed)
    print(f"{os.path.basename(tar)}: {len(made)} tasks", flush=True)
    tasks += made
  import lzma
  with lzma.open(os.path.join(args.out, "tasks.jsonl.xz"), "wt", preset=9) as f:
    for t in tasks:
      f.write(json.dumps(t, sort_keys=True) + "\n")
  print(json.dumps({"tasks": len(tasks), "out": args.out}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
