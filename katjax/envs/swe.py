"""SWE environment: an issue, the repository at its commit in a sandbox, verifying tests.

Tasks use SWE-bench's instance fields: repo, instance_id, base_commit, problem_statement,
patch (gold), test_patch, FAIL_TO_PASS, PASS_TO_PASS (lists or JSON strings); optional
`test_cmd`, `log_parser`, `repo_path`. The repository is a local git checkout: `repo_path`,
else `repo` itself if it is a directory, else `<repos_dir>/<owner>__<name>`.

Tools: `bash(command)`, `view(path, start_line, end_line)`, `edit(path, old_str, new_str)`
(exact, unique replacement; empty old_str creates the file), `submit()`. The submission is
the working tree's diff against base_commit; `evaluate` grades it in a fresh sandbox
(`swe_grade.grade`), so nothing the agent left running can influence the tests.

With `pool=SandboxPool(...)` (katjax.sandbox.pool) the episode's sandbox and the grading
sandbox are leased from warm, reset sandboxes instead of being started and torn down each
time; the pool's size bounds how many run at once and further episodes queue. The test
time limit is the task's `timeout` field, else `test_timeout`.
"""

from __future__ import annotations

import os
import shlex

from katjax.envs.base import Environment, ToolError, register_env, tool_spec
from katjax.envs.swe_grade import TaskError, grade, test_ids

__all__ = ["SWEEnv", "resolve_repo", "REQUIRED_FIELDS"]

REQUIRED_FIELDS = ("repo", "instance_id", "base_commit", "problem_statement", "test_patch",
                   "FAIL_TO_PASS", "PASS_TO_PASS")

SYSTEM_PROMPT = (
  "You are a software engineer working in a git repository at the current directory. "
  "Fix the issue described by the user. Use the bash, view and edit tools; do not modify "
  "tests. Call submit when the fix is complete.")


@register_env("swe")
class SWEEnv(Environment):
  """SWE-bench style repository-repair environment over a local or Docker sandbox."""

  def __init__(self, backend: str = "local", repos_dir: str | None = None,
               command_timeout: float = 60.0, test_timeout: float = 300.0,
               sandbox_options: dict | None = None, system_prompt: str = SYSTEM_PROMPT,
               pool=None):
    super().__init__()
    from katjax.sandbox import BACKENDS
    if backend not in BACKENDS:
      raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")
    self.backend, self.repos_dir = backend, repos_dir
    self.command_timeout, self.test_timeout = command_timeout, test_timeout
    self.sandbox_options = dict(sandbox_options or {})
    self.pool = pool
    if pool is not None and pool.backend != backend:
      raise ValueError(f"pool backend {pool.backend!r} differs from backend {backend!r}")
    self._lease = None
    self.system_prompt = system_prompt
    self.task: dict | None = None
    self.sandbox = None
    self.repo_dir: str | None = None
    self.submission: str | None = None

  def reset(self, task: dict):
    missing = [k for k in REQUIRED_FIELDS if k not in task]
    if missing:
      raise TaskError(f"task {task.get('instance_id')!r} is missing fields {missing}")
    if not test_ids(task, "FAIL_TO_PASS"):
      raise TaskError(f"task {task['instance_id']!r} has no FAIL_TO_PASS tests")
    repo_dir = resolve_repo(task, self.repos_dir)
    self.close()
    self.task, self.repo_dir, self.submission, self.done = task, repo_dir, None, False
    if self.pool is not None:
      self._lease = self.pool.lease()
      self.sandbox = self._lease.__enter__()
    else:
      self.sandbox = self._new_sandbox()
    from katjax.envs.swe_grade import checkout
    err = checkout(self.sandbox, repo_dir, task["base_commit"])
    if err:
      self.close()
      raise TaskError(f"task {task['instance_id']!r}: {err}")
    self.tools = [
      tool_spec("bash", "Run a bash command in the repository root; returns its output.",
                {"command": {"type": "string"}}),
      tool_spec("view", "Show a file with line numbers (optionally a line range).",
                {"path": {"type": "string"}, "start_line": {"type": "integer"},
                 "end_line": {"type": "integer"}}, required=["path"]),
      tool_spec("edit", "Replace the unique occurrence of old_str by new_str in a file "
                "(empty old_str creates the file with new_str).",
                {"path": {"type": "string"}, "old_str": {"type": "string"},
                 "new_str": {"type": "string"}}),
      tool_spec("submit", "Submit the current changes as the fix and end the episode.", {}),
    ]
    user = (f"Repository: {task['repo']}\n\n<issue>\n{task['problem_statement']}\n</issue>\n\n"
            "Make the minimal change to the source so the issue is resolved.")
    return [{"role": "system", "content": self.system_prompt},
            {"role": "user", "content": user}], self.tools

  # -- tools -------------------------------------------------------------------------------

  def tool_bash(self, command) -> str:
    out, code, timed_out = self._sb().exec(str(command), timeout=self.command_timeout)
    if timed_out:
      return out + f"\n[command killed after {self.command_timeout:g}s]"
    return out + (f"\n[exit code {code}]" if code else "")

  def tool_view(self, path, start_line=None, end_line=None) -> str:
    text = self._read(path)
    lines = text.splitlines()
    lo = max(int(start_line or 1), 1)
    hi = min(int(end_line or len(lines)), len(lines))
    return "\n".join(f"{i:6d}\t{lines[i - 1]}" for i in range(lo, hi + 1))

  def tool_edit(self, path, old_str, new_str) -> str:
    old_str, new_str = str(old_str), str(new_str)
    if not old_str:
      try:
        self._read(path)
      except ToolError:
        self._sb().write_file(path, new_str)
        return f"Created {path}."
      raise ToolError(f"{path} exists; give old_str to edit it")
    text = self._read(path)
    count = text.count(old_str)
    if count != 1:
      raise ToolError(f"old_str occurs {count} times in {path}; it must occur exactly once")
    self._sb().write_file(path, text.replace(old_str, new_str))
    return f"Edited {path}."

  def tool_submit(self) -> str:
    self.submission = self.current_diff()
    self.done = True
    return "Submitted."

  # -- grading -----------------------------------------------------------------------------

  def current_diff(self) -> str:
    """The working tree's diff against base_commit (new files included)."""
    # Through a file: exec output is capped, a patch must not be.
    out, code, _ = self._sb().exec(
      "git add -A >/dev/null && git diff --cached --no-color --binary "
      f"{shlex.quote(self.task['base_commit'])} > .git/katjax-submission.patch", timeout=60)
    if code != 0:
      raise ToolError(f"could not compute the diff: {out[-300:]}")
    return self._sb().read_file(".git/katjax-submission.patch", max_bytes=8 << 20)

  def evaluate(self):
    if self.task is None:
      raise ValueError("evaluate() called before reset()")
    patch = self.submission
    if patch is None:
      try:
        patch = self.current_diff() if self.sandbox is not None else ""
      except ToolError:
        patch = ""
    if self.pool is not None:  # hand the episode's sandbox back before leasing one to grade
      self.close()
    return self.grade(patch)

  def grade(self, patch: str) -> tuple[float, dict]:
    """Grades an arbitrary patch for the current task: (1.0 if resolved else 0.0, info)."""
    resolved, info = grade(self.task, patch, self._grading_sandbox, self.repo_dir,
                           timeout=self.test_timeout)
    info["resolved"] = resolved
    return float(resolved), info

  def close(self):
    if self._lease is not None:
      lease, self._lease, self.sandbox = self._lease, None, None
      lease.__exit__(None, None, None)
    if self.sandbox is not None:
      self.sandbox.close()
      self.sandbox = None

  # -- helpers -----------------------------------------------------------------------------

  def _new_sandbox(self, **extra):
    from katjax.sandbox import make_sandbox
    return make_sandbox(self.backend, **{**self.sandbox_options, **extra})

  def _grading_sandbox(self):
    # The test log comes back through a file, not the output cap (swe_grade).
    return self.pool.lease() if self.pool is not None else self._new_sandbox()

  def _sb(self):
    if self.sandbox is None:
      raise ToolError("no active episode: call reset() first")
    return self.sandbox

  def _read(self, path) -> str:
    try:
      return self._sb().read_file(str(path))
    except FileNotFoundError:
      raise ToolError(f"no such file: {path}") from None
    except ValueError as e:
      raise ToolError(str(e)) from None


def resolve_repo(task: dict, repos_dir: str | None = None) -> str:
  """The local git checkout for a task; TaskError naming what was tried when absent."""
  tried = []
  if task.get("repo_path"):
    tried.append(task["repo_path"])
  repo = str(task.get("repo", ""))
  if repo and os.path.isabs(repo):
    tried.append(repo)
  if repos_dir and repo:
    tried.append(os.path.join(repos_dir, repo.replace("/", "__")))
    tried.append(os.path.join(repos_dir, repo))
  for path in tried:
    if os.path.isdir(os.path.join(path, ".git")):
      return path
  raise TaskError(f"repository for task {task.get('instance_id')!r} not found "
                  f"(repo={repo!r}); tried {tried or 'nothing: set repo_path or repos_dir'}")

