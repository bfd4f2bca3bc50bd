"""Containment tests run against every sandbox backend (local, and Docker when reachable)."""

import os
import tempfile
import threading
import time

import pytest

from katjax.sandbox import OutputCap, check_relpath, make_sandbox


def test_exec_and_files(sandbox):
  out, code, timed_out = sandbox.exec("echo hello; echo err >&2; exit 3", timeout=10)
  assert (code, timed_out) == (3, False)
  assert out.splitlines() == ["hello", "err"]
  sandbox.write_file("sub/dir/a.txt", "x = 1\n")
  assert sandbox.read_file("sub/dir/a.txt") == "x = 1\n"
  assert sandbox.exec("cat sub/dir/a.txt", timeout=10)[0] == "x = 1\n"
  with pytest.raises(FileNotFoundError):
    sandbox.read_file("missing.txt")
  for bad in ("/etc/passwd", "../outside", "a/../../b"):
    with pytest.raises(ValueError):
      sandbox.write_file(bad, "no")


def test_symlink_escape_refused(sandbox):
  sandbox.exec("ln -sf /etc/hostname link", timeout=10)
  if sandbox.workdir.startswith("/work"):  # Docker: the link resolves inside the container
    return
  with pytest.raises(ValueError, match="outside the workdir"):
    sandbox.read_file("link")


def test_sleep_forever_is_killed_and_sandbox_still_works(sandbox):
  start = time.monotonic()
  out, code, timed_out = sandbox.exec("echo started; sleep infinity", timeout=1.5)
  elapsed = time.monotonic() - start
  assert timed_out and code == 137
  assert elapsed < 8, elapsed
  assert "started" in out
  assert sandbox.exec("echo alive", timeout=10) == ("alive\n", 0, False)


def test_network_fails(sandbox):
  if getattr(sandbox, "network_isolated", True) is False:
    pytest.skip("local sandbox without bubblewrap has no network isolation")
  code = ("import socket\n"
          "for host in [('1.1.1.1', 80), ('deb.debian.org', 80)]:\n"
          "  try:\n"
          "    socket.create_connection(host, timeout=3); print('CONNECTED')\n"
          "  except OSError as e:\n"
          "    print('blocked', e)\n")
  sandbox.write_file("net.py", code)
  out, _, _ = sandbox.exec("python3 net.py", timeout=20)
  assert "CONNECTED" not in out and out.count("blocked") == 2, out


def test_writes_outside_workdir_fail(sandbox):
  # A host directory that would be writable by anyone: the sandbox still cannot reach it.
  outside = tempfile.mkdtemp(prefix="katjax-outside-", dir="/var/tmp")
  os.chmod(outside, 0o777)
  try:
    targets = ["/etc/katjax_probe", "/usr/katjax_probe", f"{outside}/probe", "/katjax_probe"]
    for t in targets:
      out, code, _ = sandbox.exec(f"echo x > {t}", timeout=10)
      assert code != 0, (t, out)
    assert os.listdir(outside) == []
    assert not os.path.exists("/etc/katjax_probe")
    assert sandbox.exec("echo ok > inside.txt && cat inside.txt", timeout=10)[0] == "ok\n"
  finally:
    os.rmdir(outside)


def test_fork_bomb_contained(sandbox):
  # Bounded by the PID limit and the timeout; the host and the sandbox survive.
  out, code, _ = sandbox.exec("bomb() { bomb | bomb & }; bomb; sleep 2; echo done", timeout=4)
  assert code != 0 or "done" in out
  time.sleep(0.5)
  assert sandbox.exec("echo alive", timeout=20)[0] == "alive\n"


def test_4gb_allocation_contained(sandbox):
  out, code, _ = sandbox.exec(
    "python3 -c \"b = bytearray(4 << 30); b[::4096] = b'x' * len(b[::4096]); print('ALLOCATED')\"",
    timeout=60)
  assert code != 0 and "ALLOCATED" not in out
  assert sandbox.exec("echo alive", timeout=10)[0] == "alive\n"


def test_one_megabyte_of_output_is_capped(sandbox):
  out, code, _ = sandbox.exec("python3 -c \"print('a' * 1000000, end=''); print('END')\"",
                              timeout=30)
  assert code == 0
  assert len(out) < 40_000
  head, rest = out.split("\n[... ", 1)
  elided, tail = rest.split(" bytes elided ...]\n", 1)
  assert head == "a" * len(head) and tail.endswith("a" * 100 + "END\n")
  assert len(head) + int(elided) + len(tail) == 1_000_004


def test_output_cap_matches_reference():
  data = bytes(range(256)) * 40
  for limit in (2, 10, 100, 4096, 20000):
    for chunk in (1, 7, 1000):
      cap = OutputCap(limit)
      for i in range(0, len(data), chunk):
        cap.feed(data[i:i + chunk])
      h, t = limit // 2, limit - limit // 2
      if len(data) <= limit:
        assert cap.text() == data.decode("utf-8", "replace")
      else:
        want = (data[:h].decode("utf-8", "replace")
                + f"\n[... {len(data) - h - t} bytes elided ...]\n"
                + data[-t:].decode("utf-8", "replace"))
        assert cap.text() == want, (limit, chunk)


def test_check_relpath():
  assert check_relpath("a/./b/../c") == "a/c"
  for bad in ("", "/x", "..", "../x", "a\x00b"):
    with pytest.raises(ValueError):
      check_relpath(bad)


def test_fork_bomb_does_not_starve_another_sandbox(sandbox):
  # RLIMIT_NPROC counts processes per uid host-wide: each sandbox runs as its own uid, so a
  # fork bomb at its limit in one leaves the other able to start processes.
  kind = "docker" if hasattr(sandbox, "container") else "local"
  other = make_sandbox(kind, memory_mb=512, pids_limit=64) if kind == "docker" \
    else make_sandbox(kind, memory_mb=512, max_procs=64)
  try:
    assert other.uid != sandbox.uid
    bomb = threading.Thread(target=sandbox.exec, daemon=True, args=(
        "bomb() { bomb | bomb & }; bomb; sleep 6", 8))
    bomb.start()
    time.sleep(2)  # the bomb is at its process limit now
    for _ in range(3):
      out, code, _ = other.exec("for i in 1 2 3 4 5; do (true) ; done; echo alive", timeout=20)
      assert (out, code) == ("alive\n", 0)
    bomb.join(30)
  finally:
    other.close()
  assert sandbox.exec("echo alive", timeout=20)[0] == "alive\n"


RESERVING_SUITE = """import threading


def test_reserves_much_touches_little():
    # calloc'd: 2 GiB of address space, almost no resident pages (as numpy / BLAS / glibc
    # arenas do); an address-space rlimit of the sandbox's memory size makes this MemoryError.
    buf = bytes(2 << 30)
    out = []
    threads = [threading.Thread(target=lambda: out.append(len(bytes(1 << 20))))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(buf) == 2 << 30 and out == [1 << 20] * 16
"""


def test_reservation_heavy_suite_passes_under_the_memory_limit(sandbox):
  if getattr(sandbox, "memory_limit", "cgroup") != "cgroup":
    pytest.skip("local sandbox without a memory cgroup (not root): RLIMIT_DATA fallback")
  sandbox.write_file("test_reserve.py", RESERVING_SUITE)
  cmd = "python3 -m pytest -q -p no:cacheprovider test_reserve.py"
  out, code, _ = sandbox.exec(cmd, timeout=60)
  assert code == 0 and "1 passed" in out, out[-2000:]
  # The same suite under an address-space rlimit of the sandbox's 512 MB: the old failure.
  out, code, _ = sandbox.exec(f"ulimit -v {512 << 10}; {cmd}", timeout=60)
  assert code != 0 and "MemoryError" in out, out[-2000:]
