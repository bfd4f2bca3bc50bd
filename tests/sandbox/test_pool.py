"""SandboxPool: warm reuse with a clean reset, bounded concurrency in arrival order; and the
local sandbox starts commands without a Python-level fork (JAX warns that forking its
multithreaded process can deadlock)."""

import os
import threading
import time

import pytest

from katjax.sandbox.pool import SandboxPool

from conftest import backend_params  # noqa: E402  (tests/sandbox/conftest.py)


@pytest.fixture(scope="module", params=backend_params())
def pool(request):
  with SandboxPool(request.param, size=1, memory_mb=512) as p:
    yield p


def test_reuse_resets_files_and_processes(pool):
  with pool.lease() as sb:
    first = sb
    sb.write_file("left/over.txt", "secret")
    # A background writer that would outlive the episode, a read-only dir, a /tmp file.
    out, code, _ = sb.exec("chmod 500 left; echo bg > /tmp/t; "
                           "(sleep 1.5; echo late > late.txt) > /dev/null 2>&1 & echo ok",
                           timeout=10)
    assert (out, code) == ("ok\n", 0)
  with pool.lease() as sb:
    assert sb is first  # warm: no new sandbox
    time.sleep(2)
    out, code, _ = sb.exec("ls -A; cat /tmp/t 2>/dev/null; echo end", timeout=10)
    assert out == "end\n", out
  assert pool.stats["created"] == 1 and pool.stats["reused"] >= 1


def test_bounded_concurrency_first_come_first_served():
  order, running, peak = [], [0], [0]
  lock = threading.Lock()
  with SandboxPool("local", size=2) as pool:
    def episode(i):
      with pool.lease() as sb:
        with lock:
          order.append(i)
          running[0] += 1
          peak[0] = max(peak[0], running[0])
        sb.exec("sleep 0.3", timeout=10)
        with lock:
          running[0] -= 1

    threads = []
    for i in range(6):
      threads.append(threading.Thread(target=episode, args=(i,)))
      threads[-1].start()
      time.sleep(0.05)  # arrival order 0..5
    for t in threads:
      t.join(60)
    assert peak[0] == 2 and pool.stats["created"] == 2
    assert order[2:] == [2, 3, 4, 5]  # the queue is served in arrival order
    with pytest.raises(TimeoutError, match="no sandbox free"):
      leases = [pool.acquire(), pool.acquire()]
      try:
        pool.acquire(timeout=0.2)
      finally:
        for sb in leases:
          pool.release(sb)


def test_local_exec_runs_no_python_fork():
  forks = []
  os.register_at_fork(before=lambda: forks.append(1))  # what JAX hooks to warn
  from katjax.sandbox import make_sandbox
  with make_sandbox("local") as sb:
    assert sb.exec("echo hi", timeout=10)[0] == "hi\n"
  assert forks == []
