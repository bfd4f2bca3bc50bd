"""A memory cgroup per local sandbox: bounds what commands touch, not what they reserve.

An address-space rlimit (RLIMIT_AS) counts virtual reservations: glibc's per-thread malloc
arenas, thread stacks, an mmap a library makes "just in case". Legitimate test suites then
die with MemoryError although they use little memory. A memory cgroup counts resident pages
(what the kernel actually charges), so the same limit contains a memory hog and lets a
reservation-heavy suite run. Docker sandboxes get this from the container's own cgroup;
the local sandbox makes one here when the host lets it (root with a writable cgroup v1
`memory` hierarchy or cgroup v2 with the memory controller). Without it, `available()` is
False and the local sandbox falls back to RLIMIT_DATA (documented there).

A command joins its cgroup itself, first thing (`echo $$ > cgroup.procs` in the wrapper
shell, still root, before it drops to the sandbox uid), so no process of it ever runs
outside; its children inherit membership, and `kill_all` reaches even ones that left the
session.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

__all__ = ["MemoryCgroup", "available", "sweep"]

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOT = "/sys/fs/cgroup"
PARENT = "katjax"


def available() -> bool:
  """True when this process can create memory cgroups (probed by making and removing one).

  Also removes the cgroups of sandboxes whose owner process is gone (a crashed run).
  """
  try:
    cg = MemoryCgroup(64 << 20)
  except OSError:
    return False
  cg.remove()
  sweep()
  return True


def sweep() -> int:
  """Removes `sbx-<pid>-*` cgroups whose owner pid is dead; how many were removed."""
  removed = 0
  for root in (V1_ROOT, V2_ROOT):
    parent = os.path.join(root, PARENT)
    if not os.path.isdir(parent):
      continue
    for name in os.listdir(parent):
      parts = name.split("-")
      if len(parts) != 3 or parts[0] != "sbx" or not parts[1].isdigit():
        continue
      try:
        os.kill(int(parts[1]), 0)
        continue  # owner alive
      except ProcessLookupError:
        pass
      except PermissionError:
        continue
      cg = object.__new__(MemoryCgroup)
      cg.path = os.path.join(parent, name)
      cg.procs_file = os.path.join(cg.path, "cgroup.procs")
      cg.remove()
      removed += 1
  return removed


class MemoryCgroup:
  """One memory cgroup with a hard limit (no swap beyond it); OSError if it cannot be made."""

  def __init__(self, limit_bytes: int):
    self.v2 = not os.path.isdir(V1_ROOT) and os.path.exists(f"{V2_ROOT}/cgroup.controllers")
    root = V2_ROOT if self.v2 else V1_ROOT
    parent = os.path.join(root, PARENT)
    os.makedirs(parent, exist_ok=True)
    if self.v2:  # children of `parent` may only use controllers enabled in its subtree_control
      _write(f"{root}/cgroup.subtree_control", "+memory", ignore_errors=True)
      _write(f"{parent}/cgroup.subtree_control", "+memory", ignore_errors=True)
    self.path = os.path.join(parent, f"sbx-{os.getpid()}-{uuid.uuid4().hex[:10]}")
    os.mkdir(self.path)
    try:
      if self.v2:
        _write(f"{self.path}/memory.max", str(limit_bytes))
        _write(f"{self.path}/memory.swap.max", "0", ignore_errors=True)
      else:
        _write(f"{self.path}/memory.limit_in_bytes", str(limit_bytes))
        _write(f"{self.path}/memory.memsw.limit_in_bytes", str(limit_bytes), ignore_errors=True)
    except OSError:
      self.remove()
      raise
    self.procs_file = f"{self.path}/cgroup.procs"

  def pids(self) -> list[int]:
    try:
      with open(self.procs_file) as f:
        return [int(p) for p in f.read().split()]
    except OSError:
      return []

  def kill_all(self, rounds: int = 4) -> None:
    """SIGKILLs every process in the cgroup, in rounds (a fork bomb keeps forking)."""
    for _ in range(rounds):
      pids = self.pids()
      if not pids:
        return
      for pid in pids:
        try:
          os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
          pass

  def peak_bytes(self) -> int | None:
    name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
    try:
      with open(f"{self.path}/{name}") as f:
        return int(f.read())
    except (OSError, ValueError):
      return None

  def remove(self) -> None:
    self.kill_all()
    for _ in range(50):  # rmdir fails while the kernel still reaps the killed processes
      try:
        os.rmdir(self.path)
        return
      except FileNotFoundError:
        return
      except OSError:
        time.sleep(0.02)


def _write(path: str, value: str, ignore_errors: bool = False) -> None:
  try:
    with open(path, "w") as f:
      f.write(value)
  except OSError:
    if not ignore_errors:
      raise
