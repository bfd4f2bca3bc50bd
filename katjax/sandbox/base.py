"""Sandbox interface shared by the Docker and local backends, and bounded output capture.

A sandbox is a private writable working directory plus a way to run shell commands in it:
`exec(cmd, timeout) -> (output, exit_code, timed_out)`, `write_file`, `read_file`,
`upload_dir`, `reset` (reuse from a pool), `close`. Paths given to the file methods are
relative to the workdir; absolute paths and `..` escapes are refused (ValueError), so the
host-side file API can never reach outside the sandbox even though it runs with the host's
privileges.
"""

from __future__ import annotations

import abc
import collections
import itertools
import os
import posixpath

__all__ = ["Sandbox", "SandboxError", "OutputCap", "check_relpath", "DEFAULT_OUTPUT_LIMIT"]

DEFAULT_OUTPUT_LIMIT = 32 * 1024  # bytes kept per command (head + tail)

_uid_counter = itertools.count()


def sandbox_uid(base: int, span: int) -> int:
  """A command uid in [base, base + span) of its own for one sandbox.

  RLIMIT_NPROC counts every process of a uid host-wide, across containers and host
  processes (pytest-xdist workers, parallel rollout workers), so sandboxes sharing a uid
  would let a fork bomb in one starve the others. Unique per host pid and, within a
  process, per sandbox (100 in turn). Uids above the system range need no account.
  """
  return base + (os.getpid() % (span // 100)) * 100 + next(_uid_counter) % 100


class SandboxError(RuntimeError):
  """The sandbox itself failed (engine unreachable, container gone), not the command."""


class Sandbox(abc.ABC):
  """A working directory and a shell; see the module docstring."""

  workdir: str

  @abc.abstractmethod
  def exec(self, cmd: str, timeout: float = 60.0) -> tuple[str, int, bool]:
    """Runs `bash -c cmd` in the workdir: (capped output, exit code, timed_out).

    stdout and stderr are merged. On timeout every process of the command is killed and
    the exit code is 137; the sandbox stays usable.
    """

  @abc.abstractmethod
  def write_file(self, path: str, content: str | bytes) -> None:
    """Writes a file (parents created) at a workdir-relative path."""

  @abc.abstractmethod
  def read_file(self, path: str, max_bytes: int = 1 << 20) -> str:
    """Reads a workdir-relative file (utf-8, errors replaced); FileNotFoundError if absent."""

  @abc.abstractmethod
  def upload_dir(self, src: str, dest: str = ".") -> None:
    """Copies a host directory's contents into the workdir at `dest`."""

  @abc.abstractmethod
  def close(self) -> None:
    """Kills everything and deletes the workdir. Safe to call twice."""

  @abc.abstractmethod
  def reset(self) -> None:
    """Kills every process of the sandbox and empties its workdir, keeping it open (pools)."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


class OutputCap:
  """Keeps the first and last `limit // 2` bytes of a stream and counts what it drops."""

  def __init__(self, limit: int = DEFAULT_OUTPUT_LIMIT):
    if limit < 2:
      raise ValueError(f"output limit must be >= 2 bytes, got {limit}")
    self.head_limit = limit // 2
    self.tail_limit = limit - self.head_limit
    self.head = bytearray()
    self.tail: collections.deque = collections.deque()
    self.tail_len = 0
    self.total = 0

  def feed(self, chunk: bytes) -> None:
    self.total += len(chunk)
    room = self.head_limit - len(self.head)
    if room > 0:
      self.head += chunk[:room]
      chunk = chunk[room:]
    if not chunk:
      return
    self.tail.append(bytes(chunk))
    self.tail_len += len(chunk)
    while self.tail_len - len(self.tail[0]) >= self.tail_limit:
      self.tail_len -= len(self.tail.popleft())

  def text(self) -> str:
    tail = b"".join(self.tail)[-self.tail_limit:] if self.tail else b""
    elided = self.total - len(self.head) - len(tail)
    head = bytes(self.head).decode("utf-8", "replace")
    tail_s = tail.decode("utf-8", "replace")
    if elided <= 0:
      return head + tail_s
    return f"{head}\n[... {elided} bytes elided ...]\n{tail_s}"


def check_relpath(path: str) -> str:
  """Normalises a workdir-relative path; ValueError for absolute paths or `..` escapes."""
  if not isinstance(path, str) or not path or "\x00" in path:
    raise ValueError(f"invalid sandbox path {path!r}")
  if path.startswith("/"):
    raise ValueError(f"sandbox paths are relative to the workdir, got absolute path {path!r}")
  norm = posixpath.normpath(path)
  if norm == ".." or norm.startswith("../"):
    raise ValueError(f"sandbox path {path!r} escapes the workdir")
  return norm
