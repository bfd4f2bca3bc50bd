"""Unified-diff reading shared by grading, task synthesis and the rollout deviation monitor.

One parser, so the files a gold patch "touches" mean the same thing when grading refuses a
patch that edits tests, when synthesis measures a task's difficulty, and when the rollout
monitor checks that an agent stays near the gold files.
"""

from __future__ import annotations

import re

__all__ = ["diff_files", "diff_stats", "split_file_diffs"]

_GIT_HEADER = re.compile(r"^diff --git a/(.+?) b/(.+)$")
_SIDE = re.compile(r"^(?:---|\+\+\+) (?:[ab]/)?([^\t\n]+)")


def diff_files(diff: str) -> list[str]:
  """Paths a unified diff changes, in order of appearance, without duplicates.

  Both sides of a rename count; `/dev/null` (file creation or deletion) is skipped. Reads
  `diff --git` headers (so a pure rename or mode change without hunks counts) and the
  `---` / `+++` lines of plain `diff -u` output alike.
  """
  paths: list[str] = []
  for line in diff.splitlines():
    m = _GIT_HEADER.match(line)
    names = m.groups() if m else ()
    if not m:
      s = _SIDE.match(line)
      names = (s.group(1).rstrip(),) if s else ()
    for name in names:
      if name != "/dev/null" and name not in paths:
        paths.append(name)
  return paths


def diff_stats(diff: str) -> dict:
  """{"files": n, "lines": added + removed} of a unified diff (difficulty of a gold patch)."""
  lines = 0
  for line in diff.splitlines():
    if (line.startswith("+") and not line.startswith("+++ ")) or \
       (line.startswith("-") and not line.startswith("--- ")):
      lines += 1
  return {"files": len(diff_files(diff)), "lines": lines}


def split_file_diffs(diff: str) -> list[str]:
  """A git diff cut into one chunk per file (each starting at its `diff --git` line)."""
  return [c for c in re.split(r"(?m)^(?=diff --git )", diff) if c.startswith("diff --git ")]
