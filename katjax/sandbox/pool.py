"""A pool of warm sandboxes: bounded concurrency, FIFO queue, clean reset between leases.

Starting a container costs far more than an episode's commands, and a host cannot run
unboundedly many at once. `SandboxPool(backend, size)` keeps up to `size` sandboxes alive;
`with pool.lease() as sb:` hands out an idle one (making it on first need), or waits in
line (first come, first served) while all `size` are leased. On release the sandbox is
reset (every process of it killed, its workdir and /tmp emptied) before the next lease, so
nothing of one episode reaches the next; one that fails to reset is closed and replaced.
A lease is a context manager like a sandbox itself, so code written against
`make_sandbox()` (`with make() as sb:`) takes `pool.lease` unchanged.
"""

from __future__ import annotations

import collections
import threading
import time

from katjax.sandbox.base import Sandbox

__all__ = ["SandboxPool", "Lease"]


class SandboxPool:
  """Up to `size` reusable sandboxes of one backend; see the module docstring."""

  def __init__(self, backend: str = "local", size: int = 4, **options):
    if size < 1:
      raise ValueError(f"pool size must be >= 1, got {size}")
    self.backend, self.size, self.options = backend, size, options
    self._idle: list[Sandbox] = []
    self._leased = 0
    self._waiters: collections.deque = collections.deque()
    self._lock = threading.Lock()
    self._closed = False
    self.stats = {"created": 0, "reused": 0, "reset_failures": 0, "waited_s": 0.0}

  def lease(self, timeout: float | None = None) -> "Lease":
    """A context manager yielding a clean sandbox; TimeoutError after `timeout` seconds."""
    return Lease(self, timeout)

  def acquire(self, timeout: float | None = None) -> Sandbox:
    """Blocks until a sandbox is free (FIFO), then returns it; pair with `release`."""
    start = time.monotonic()
    me = threading.Event()
    with self._lock:
      if self._closed:
        raise ValueError("acquire on a closed pool")
      self._waiters.append(me)
      self._wake_locked()
    if not me.wait(timeout):
      with self._lock:
        if not me.is_set():
          self._waiters.remove(me)
          raise TimeoutError(f"no sandbox free within {timeout}s (pool size {self.size})")
    with self._lock:
      self.stats["waited_s"] += time.monotonic() - start
      sb = self._idle.pop() if self._idle else None
      self.stats["reused" if sb is not None else "created"] += 1
    if sb is not None:
      return sb
    try:
      from katjax.sandbox import make_sandbox
      sb = make_sandbox(self.backend, **self.options)
    except BaseException:
      with self._lock:
        self._leased -= 1
        self._wake_locked()
      raise
    return sb

  def release(self, sb: Sandbox) -> None:
    """Resets `sb` and returns it to the pool (closes it if the reset fails)."""
    keep = not self._closed
    if keep:
      try:
        sb.reset()
      except Exception:  # noqa: BLE001 - a broken sandbox is replaced, never reused
        keep = False
    if not keep:
      sb.close()
    with self._lock:
      self.stats["reset_failures"] += not keep and not self._closed
      self._leased -= 1
      if keep and not self._closed:
        self._idle.append(sb)
      elif keep:
        sb.close()
      self._wake_locked()

  def close(self) -> None:
    """Closes the idle sandboxes now and leased ones when they come back."""
    with self._lock:
      self._closed = True
      idle, self._idle = self._idle, []
    for sb in idle:
      sb.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _wake_locked(self) -> None:
    # Grants a slot to waiters in arrival order while fewer than `size` are leased.
    while self._waiters and self._leased < self.size:
      self._leased += 1
      self._waiters.popleft().set()


class Lease:
  """`with pool.lease() as sb:` acquires on entry and releases (reset) on exit."""

  def __init__(self, pool: SandboxPool, timeout: float | None = None):
    self.pool, self.timeout, self.sandbox = pool, timeout, None

  def __enter__(self) -> Sandbox:
    self.sandbox = self.pool.acquire(self.timeout)
    return self.sandbox

  def __exit__(self, *exc):
    sb, self.sandbox = self.sandbox, None
    if sb is not None:
      self.pool.release(sb)
