"""LocalSandbox: a temp workdir and commands run under bubblewrap, a memory cgroup and rlimits.

With bubblewrap (`bwrap`) installed and working: the host root is mounted read-only, the
workdir read-write, /tmp is a private tmpfs, and network, PID, IPC and UTS namespaces are
unshared (no network, and killing bwrap kills every process of the command). Without it:
a plain process group. Limits (defaults in `LocalSandbox.__init__`):
- memory: a memory cgroup per sandbox (`katjax.sandbox.cgroup`; resident memory, so a suite
  that reserves address space it never touches runs, while a hog is OOM-killed), when the
  host process may make one (root); otherwise RLIMIT_DATA as a best effort, which, unlike
  RLIMIT_AS, ignores reservations made without write access (thread stacks' guard areas,
  PROT_NONE arenas) but still counts untouched writable mappings;
- processes (RLIMIT_NPROC, per uid), file size, CPU seconds, no core files.
When the host process is root the command runs as an unprivileged uid of its own (root
ignores RLIMIT_NPROC, so a fork bomb would not be contained otherwise).

No Python runs between fork and exec: the child is started with neither `preexec_fn` nor
`user=` (so `subprocess` uses vfork, and JAX's fork warning and its deadlock risk do not
apply); a root wrapper shell joins the cgroup, sets the rlimits with `ulimit` and drops to
the sandbox uid with `setpriv` before running the command. On timeout, or when the command
ends, its process group and everything in its cgroup are SIGKILLed.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading

from katjax.sandbox import cgroup
from katjax.sandbox.base import (DEFAULT_OUTPUT_LIMIT, OutputCap, Sandbox, check_relpath,
                                 sandbox_uid)

__all__ = ["LocalSandbox", "bwrap_available"]

# Command uids of local sandboxes (`sandbox_uid`); the Docker sandboxes use 300000 and above.
UID_BASE, UID_SPAN = 200_000, 100_000


# The system's tools, not the caller's (a venv or pyenv under /root is unreadable to the
# unprivileged sandbox user): tasks need python3 with pytest, and git, installed system-wide.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class LocalSandbox(Sandbox):
  """Host-process sandbox; see the module docstring for the isolation it provides."""

  def __init__(self, memory_mb: int = 1024, max_procs: int = 256, max_file_mb: int = 256,
               cpu_seconds: int = 600, output_limit: int = DEFAULT_OUTPUT_LIMIT,
               use_bwrap: bool | None = None, uid: int | None = None, root: str | None = None,
               path: str = SYSTEM_PATH):
    self.memory_mb, self.max_procs, self.max_file_mb = memory_mb, max_procs, max_file_mb
    self.cpu_seconds, self.output_limit, self.path = cpu_seconds, output_limit, path
    root_user = os.geteuid() == 0
    if uid is None and root_user:
      uid = sandbox_uid(UID_BASE, UID_SPAN)
    self.uid = uid
    self.cgroup = None
    if root_user and cgroup_available():
      self.cgroup = cgroup.MemoryCgroup(memory_mb << 20)
    self.memory_limit = "cgroup" if self.cgroup else "rlimit_data"
    self.use_bwrap = bwrap_available(self.uid) if use_bwrap is None else use_bwrap
    if self.use_bwrap and not bwrap_available(self.uid):
      raise ValueError("use_bwrap=True but bubblewrap is not installed or cannot run here")
    self.network_isolated = self.use_bwrap
    self.workdir = os.path.realpath(tempfile.mkdtemp(prefix="katjax-sbx-", dir=root))
    self._chown(self.workdir)
    self._lock = threading.Lock()
    self._procs: set[subprocess.Popen] = set()
    self._closed = False

  def exec(self, cmd: str, timeout: float = 60.0) -> tuple[str, int, bool]:
    if self._closed:
      raise ValueError("exec on a closed sandbox")
    if timeout <= 0:
      raise ValueError(f"timeout must be positive, got {timeout}")
    argv = self._limited(self._wrap(["bash", "-c", cmd]))
    env = {"PATH": self.path, "HOME": self.workdir,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": "/tmp"}
    proc = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    with self._lock:
      self._procs.add(proc)
    cap = OutputCap(self.output_limit)
    reader = threading.Thread(target=_pump, args=(proc.stdout, cap), daemon=True)
    reader.start()
    timed_out = False
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      # Kill the group even on normal exit: background children must not outlive the call.
      _killpg(proc.pid)
      with self._lock:
        if self.cgroup is not None and len(self._procs) == 1:  # no other command running
          self.cgroup.kill_all()
      proc.wait()
      reader.join(timeout=5)
      with self._lock:
        self._procs.discard(proc)
    code = 137 if timed_out else proc.returncode
    if code < 0:
      code = 128 - code
    return cap.text(), code, timed_out

  def write_file(self, path: str, content: str | bytes) -> None:
    full = self._host_path(path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    with open(full, "wb") as f:
      f.write(data)
    self._chown_tree(os.path.dirname(full), full)

  def read_file(self, path: str, max_bytes: int = 1 << 20) -> str:
    full = self._host_path(path)
    if not os.path.isfile(full):
      raise FileNotFoundError(f"no such file in sandbox: {path}")
    with open(full, "rb") as f:
      return f.read(max_bytes).decode("utf-8", "replace")

  def upload_dir(self, src: str, dest: str = ".") -> None:
    if not os.path.isdir(src):
      raise FileNotFoundError(f"not a directory: {src}")
    target = self._host_path(dest)
    shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
    if self.uid is not None and os.geteuid() == 0:
      for d, dirs, files in os.walk(target):
        for name in [d] + [os.path.join(d, x) for x in dirs + files]:
          os.lchown(name, self.uid, self.uid)

  def close(self) -> None:
    if getattr(self, "_closed", True):
      return
    self._closed = True
    with self._lock:
      procs = list(self._procs)
    for p in procs:
      _killpg(p.pid)
    if self.cgroup is not None:
      self.cgroup.remove()
    shutil.rmtree(self.workdir, ignore_errors=True)

  def reset(self) -> None:
    """Kills every process of the sandbox and empties its workdir (for reuse from a pool)."""
    if self._closed:
      raise ValueError("reset on a closed sandbox")
    with self._lock:
      procs = list(self._procs)
    for p in procs:
      _killpg(p.pid)
    if self.cgroup is not None:
      self.cgroup.kill_all()
    for name in os.listdir(self.workdir):
      full = os.path.join(self.workdir, name)
      if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full, ignore_errors=True)
      else:
        os.unlink(full)

  # -- helpers ---------------------------------------------------------------------------

  def _wrap(self, argv: list[str]) -> list[str]:
    if not self.use_bwrap:
      return argv
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--bind", self.workdir, self.workdir,
            "--unshare-all", "--die-with-parent", "--new-session",
            "--chdir", self.workdir, "--"] + argv

  def _limited(self, argv: list[str]) -> list[str]:
    # A root shell joins the cgroup, sets the rlimits (bash builtins: no Python in the
    # child), then drops to the sandbox uid; exit 125 if the cgroup cannot be joined.
    steps = []
    if self.cgroup is not None:
      steps.append(f"echo $$ > {shlex.quote(self.cgroup.procs_file)} || exit 125")
    steps.append(f"ulimit -u {int(self.max_procs)} -f {int(self.max_file_mb) << 10} "
                 f"-t {int(self.cpu_seconds)} -c 0")
    if self.cgroup is None:
      steps.append(f"ulimit -d {int(self.memory_mb) << 10}")
    run = 'exec "$@"'
    if self.uid is not None and os.geteuid() == 0:
      run = f'exec setpriv --reuid={self.uid} --regid={self.uid} --clear-groups -- "$@"'
    return ["bash", "-c", "; ".join(steps + [run]), "sandbox"] + argv

  def _host_path(self, path: str) -> str:
    full = os.path.realpath(os.path.join(self.workdir, check_relpath(path)))
    # realpath resolves symlinks the sandboxed code may have planted (e.g. -> /etc/shadow).
    if full != self.workdir and not full.startswith(self.workdir + os.sep):
      raise ValueError(f"sandbox path {path!r} resolves outside the workdir")
    return full

  def _chown(self, path: str) -> None:
    if self.uid is not None and os.geteuid() == 0:
      os.lchown(path, self.uid, self.uid)

  def _chown_tree(self, top: str, leaf: str) -> None:
    self._chown(leaf)
    d = top
    while d.startswith(self.workdir + os.sep):
      self._chown(d)
      d = os.path.dirname(d)


@functools.lru_cache(maxsize=None)
def bwrap_available(uid: int | None = None) -> bool:
  """True when `bwrap` exists and can create its namespaces here (probed once per uid)."""
  if shutil.which("bwrap") is None:
    return False
  argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
          "--unshare-all", "--die-with-parent", "--", "true"]
  if uid is not None and os.geteuid() == 0:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + argv
  try:
    r = subprocess.run(argv, capture_output=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return False
  return r.returncode == 0


@functools.lru_cache(maxsize=None)
def cgroup_available() -> bool:
  """True when memory cgroups can be made here (probed once per process)."""
  return cgroup.available()


def _pump(stream, cap: OutputCap) -> None:
  try:
    while True:
      chunk = stream.read1(65536)
      if not chunk:
        break
      cap.feed(chunk)
  except (OSError, ValueError):
    pass
  finally:
    stream.close()


def _killpg(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
