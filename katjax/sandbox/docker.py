"""DockerSandbox: one hardened container per sandbox, driven through the `docker` SDK.

The container has no network, a read-only root, a private volume at /work (the only
persistent writable place; /tmp is a small tmpfs), memory / CPU / PID limits, all
capabilities dropped, no-new-privileges, an init process, and runs commands as an
unprivileged uid of its own (`base.sandbox_uid`: a fork bomb in one sandbox cannot starve
another). The keep-alive process runs as root, which alone holds two capabilities (CHOWN to
hand /work to the command uid, KILL for cleanup); a `kill -9 -1` issued as the command user
cannot stop it, and no-new-privileges keeps the command uid from ever gaining them. Each
command runs under `timeout -s KILL` inside the container, with a host-side deadline as a
second line of defence.

Every container and volume is labelled with the owning host and pid: `sweep()` removes the
ones whose owner process is gone (run at first use and at interpreter exit), so crashed
runs leave nothing behind. The image is built locally by launch/images/build_base.sh.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import shlex
import socket
import tarfile
import threading
import time
import uuid

from katjax.sandbox.base import (DEFAULT_OUTPUT_LIMIT, OutputCap, Sandbox, SandboxError,
                                 check_relpath, sandbox_uid)

__all__ = ["DockerSandbox", "docker_available", "sweep", "DEFAULT_IMAGE", "LABEL"]

DEFAULT_IMAGE = os.environ.get("KATJAX_SANDBOX_IMAGE", "katjax-sandbox:latest")
LABEL = "org.katjax.sandbox"
KEEPER_USER = "0:0"  # exec as root gets the capabilities only when the keeper is root
WORKDIR = "/work"
# Command uids of Docker sandboxes (`sandbox_uid`), apart from the local sandboxes' range.
UID_BASE, UID_SPAN = 300_000, 1_000_000


def _kill_all_script(uid: int) -> str:
  """bash (builtins only: no extra PIDs) that kills every process of `uid`, in rounds."""
  return ("for round in 1 2 3 4; do n=0; for p in /proc/[0-9]*; do "
          "while read -r k u _; do if [ \"$k\" = Uid: ]; then "
          f"[ \"$u\" = {uid} ] && kill -9 \"${{p#/proc/}}\" 2>/dev/null && n=$((n+1)); break; fi; "
          "done < \"$p/status\"; done 2>/dev/null; [ $n = 0 ] && break; done")

_swept = False
_sweep_lock = threading.Lock()


class DockerSandbox(Sandbox):
  """Container-backed sandbox; see the module docstring."""

  def __init__(self, image: str = DEFAULT_IMAGE, memory_mb: int = 1024, cpus: float = 1.0,
               pids_limit: int = 256, tmp_mb: int = 64,
               output_limit: int = DEFAULT_OUTPUT_LIMIT, client=None):
    self.client = client or _client()
    self.output_limit = output_limit
    self.nproc = max(pids_limit - 16, 8)
    self._inflight, self._inflight_lock = 0, threading.Lock()
    self.workdir = WORKDIR
    self.uid = sandbox_uid(UID_BASE, UID_SPAN)
    self.user = f"{self.uid}:{self.uid}"
    self._closed = True
    _sweep_once(self.client)
    name = f"katjax-sbx-{uuid.uuid4().hex[:12]}"
    labels = {LABEL: "1", f"{LABEL}.host": socket.gethostname(),
              f"{LABEL}.pid": str(os.getpid())}
    try:
      self.client.images.get(image)
    except Exception as e:
      raise SandboxError(f"sandbox image {image!r} not found ({e}); build it with "
                         "launch/images/build_base.sh") from None
    self.volume = self.client.volumes.create(name=name, labels=labels)
    try:
      self.container = self.client.containers.run(
        image, ["sleep", "infinity"], name=name, detach=True, init=True, labels=labels,
        user=KEEPER_USER, network_mode="none", read_only=True,
        volumes={name: {"bind": WORKDIR, "mode": "rw"}},
        tmpfs={"/tmp": f"rw,nosuid,nodev,size={tmp_mb}m,mode=1777"},
        mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m",
        nano_cpus=int(cpus * 1e9), pids_limit=pids_limit, cap_drop=["ALL"],
        # Only root (the keeper and this class's own execs) has capabilities: CHOWN hands
        # /work to the command uid, KILL ends that uid's processes.
        cap_add=["CHOWN", "KILL"],
        security_opt=["no-new-privileges"], working_dir=WORKDIR)
    except Exception:
      self.volume.remove(force=True)
      raise
    self._closed = False
    # The fresh volume holds the image's /work; hand it to this sandbox's command uid.
    code, out = self.container.exec_run(["chown", "-R", self.user, WORKDIR], user="0:0")
    if code != 0:
      self.close()
      raise SandboxError(f"could not chown {WORKDIR} to uid {self.uid}: {out!r}")

  def exec(self, cmd: str, timeout: float = 60.0) -> tuple[str, int, bool]:
    if self._closed:
      raise ValueError("exec on a closed sandbox")
    if timeout <= 0:
      raise ValueError(f"timeout must be positive, got {timeout}")
    # stderr joins stdout inside the container so the two keep their order (docker's
    # multiplexed streams do not). `ulimit -u` keeps a fork bomb below the container's PID
    # limit so cleanup can still start. `timeout` makes the command a process group of its
    # own: when the command ends, the wrapper kills that group, so its background jobs end
    # with it in the same exec (no second round trip); see `_finish` for timeouts.
    argv = ["bash", "-c", f"ulimit -u {self.nproc} 2>/dev/null; "
            f"timeout -s KILL {timeout:g} bash -c \"$1\" 2>&1 & tp=$!; wait $tp; rc=$?; "
            "kill -9 -- -$tp 2>/dev/null; exit $rc", "sandbox", cmd]
    cap, code, start = OutputCap(self.output_limit), None, time.monotonic()
    api = self.client.api
    with self._inflight_lock:
      try:
        exec_id = api.exec_create(self.container.id, argv, user=self.user,
                                  workdir=WORKDIR)["Id"]
        stream = api.exec_start(exec_id, stream=True)
      except Exception as e:
        raise SandboxError(f"docker exec failed: {e}") from e
      self._inflight += 1
    done = threading.Event()

    def pump():
      try:
        for chunk in stream:
          cap.feed(chunk)
      except Exception:
        pass
      done.set()

    threading.Thread(target=pump, daemon=True).start()
    # Background children may keep the stream open past `timeout`; the host deadline ends it.
    if not done.wait(timeout + 10):
      self._kill_user_processes()
      done.wait(5)
    code = api.exec_inspect(exec_id).get("ExitCode")
    self._finish(privileged=code is None or code == 137)
    elapsed = time.monotonic() - start
    if code is None:  # still running after the kill: report as a timeout
      code = 137
    timed_out = code == 137 and elapsed >= timeout * 0.95
    return cap.text(), int(code), timed_out

  def write_file(self, path: str, content: str | bytes) -> None:
    rel = check_relpath(path)
    data = content.encode() if isinstance(content, str) else content
    # One archive call: the parents travel as directory entries owned by the command uid.
    buf, now = io.BytesIO(), time.time()
    with tarfile.open(fileobj=buf, mode="w") as tar:
      parts = rel.split("/")
      for i in range(1, len(parts)):
        d = tarfile.TarInfo("/".join(parts[:i]))
        d.type, d.mode, d.mtime, d.uid, d.gid = tarfile.DIRTYPE, 0o755, now, self.uid, self.uid
        tar.addfile(d)
      info = tarfile.TarInfo(rel)
      info.size, info.mode, info.mtime = len(data), 0o644, now
      info.uid = info.gid = self.uid
      tar.addfile(info, io.BytesIO(data))
    try:
      ok = self.container.put_archive(WORKDIR, buf.getvalue())
    except Exception as e:  # noqa: BLE001 - e.g. a parent that is a file
      raise SandboxError(f"could not write {path} into the container: {e}") from e
    if not ok:
      raise SandboxError(f"could not write {path} into the container")

  def read_file(self, path: str, max_bytes: int = 1 << 20) -> str:
    # Through the archive API, not exec output: a file is never cut by the output cap.
    rel = check_relpath(path)
    import docker  # imported lazily: the SDK is only needed for this backend
    try:
      stream, stat = self.container.get_archive(f"{WORKDIR}/{rel}")
    except docker.errors.NotFound:
      raise FileNotFoundError(f"no such file in sandbox: {path}") from None
    except docker.errors.APIError as e:
      raise SandboxError(f"could not read {path} from the container: {e}") from e
    if stat.get("mode", 0) & (1 << 31):  # os.ModeDir in Go's FileMode
      raise FileNotFoundError(f"not a file in sandbox: {path}")
    buf = io.BytesIO()
    try:
      for chunk in stream:
        buf.write(chunk)
        if buf.tell() > max_bytes + (1 << 20):  # tar headers are small; stop reading early
          break
    finally:
      getattr(stream, "close", lambda: None)()  # the HTTP response, when cut short
    buf.seek(0)
    try:
      with tarfile.open(fileobj=buf, mode="r|") as tar:
        for member in tar:
          if not member.isfile():
            raise FileNotFoundError(f"not a regular file in sandbox: {path}")
          data = tar.extractfile(member).read(max_bytes)
          return data.decode("utf-8", "replace")
    except tarfile.ReadError:  # the stream was cut at max_bytes: decode what arrived
      pass
    raw = buf.getvalue()[512:512 + max_bytes]
    return raw.decode("utf-8", "replace")

  def upload_dir(self, src: str, dest: str = ".") -> None:
    if not os.path.isdir(src):
      raise FileNotFoundError(f"not a directory: {src}")
    rel = check_relpath(dest)
    if rel != ".":
      self._run_checked(f"mkdir -p {shlex.quote(rel)}")
    buf = io.BytesIO()

    def own(info):
      info.uid = info.gid = self.uid
      info.uname = info.gname = ""
      return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
      tar.add(src, arcname=".", filter=own)
    target = WORKDIR if rel == "." else f"{WORKDIR}/{rel}"
    if not self.container.put_archive(target, buf.getvalue()):
      raise SandboxError(f"could not upload {src} into the container")

  def close(self) -> None:
    if getattr(self, "_closed", True):
      return
    self._closed = True
    _remove(self.container, self.volume)

  def reset(self) -> None:
    """Kills every process of the command uid and empties /work and /tmp (pool reuse)."""
    if self._closed:
      raise ValueError("reset on a closed sandbox")
    self._kill_user_processes()
    # As the command uid, which owns all it made (root here lacks CAP_DAC_OVERRIDE).
    code, out = self.container.exec_run(
      ["bash", "-c", "chmod -R u+rwX /work /tmp 2>/dev/null; "
       "find /work /tmp -mindepth 1 -delete 2>/dev/null; test -z \"$(ls -A /work)\""],
      user=self.user)
    if code != 0:
      raise SandboxError(f"could not reset the sandbox: {out[-300:]!r}")

  # -- helpers ---------------------------------------------------------------------------

  def _run_checked(self, cmd: str) -> str:
    out, code, _ = self.exec(cmd, timeout=30)
    if code != 0:
      raise SandboxError(f"{cmd!r} failed in the sandbox (exit {code}): {out[-500:]}")
    return out

  def _finish(self, privileged: bool) -> None:
    # No process outlives its command: when the last concurrent command of this sandbox
    # ends, every process of the command uid is killed (`kill -9 -1` as that uid; the keep-alive
    # process runs as another uid). Commands running concurrently are left alone.
    with self._inflight_lock:
      self._inflight -= 1
      if self._inflight or not privileged:  # a normal end: the wrapper killed the group
        return
      # After a timeout or a kill: every process of the command uid, which also reaches a
      # fork bomb at its process limit and jobs that left the group (setsid).
      self._kill_user_processes()

  def _kill_user_processes(self) -> None:
    # Root with CAP_KILL (the one root capability besides CHOWN; the command uid has none)
    # kills every process of the command uid, using bash builtins only (no extra PIDs).
    try:
      exec_id = self.client.api.exec_create(self.container.id,
                                            ["bash", "-c", _kill_all_script(self.uid)],
                                            user="0:0")
      self.client.api.exec_start(exec_id["Id"])
    except Exception:
      pass


def docker_available(image: str | None = DEFAULT_IMAGE) -> tuple[bool, str]:
  """(usable?, reason): the engine answers a ping and, if given, the image exists."""
  try:
    client = _client()
    client.ping()
  except Exception as e:
    return False, f"no Docker engine reachable ({type(e).__name__}: {e})"
  if image:
    try:
      client.images.get(image)
    except Exception:
      return False, f"Docker image {image!r} missing: run launch/images/build_base.sh"
  return True, "ok"


def sweep(client=None, everything: bool = False) -> int:
  """Removes labelled containers/volumes whose owner pid on this host is dead (or all)."""
  client = client or _client()
  host, removed = socket.gethostname(), 0
  flt = {"label": LABEL}
  for c in client.containers.list(all=True, filters=flt):
    if everything or _orphaned(c.labels, host):
      _remove(c, None)
      removed += 1
  for v in client.volumes.list(filters=flt):
    labels = v.attrs.get("Labels") or {}
    if everything or _orphaned(labels, host):
      try:
        v.remove(force=True)
      except Exception:  # still attached to a container being removed by another sweep
        pass
  return removed


def _orphaned(labels: dict, host: str) -> bool:
  if labels.get(f"{LABEL}.host") != host:
    return False
  try:
    pid = int(labels.get(f"{LABEL}.pid", "0"))
  except ValueError:
    return True
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _remove(container, volume, attempts: int = 6) -> None:
  """Remove a container and its volume, retrying: under load the engine can time out or
  answer 409 (removal already in progress), and a container must never be left behind."""
  import docker  # imported lazily: the SDK is only needed for this backend

  for what, remove in (("container", lambda: container.remove(force=True, v=True)),
                       ("volume", lambda: volume and volume.remove(force=True))):
    for attempt in range(attempts):
      try:
        remove()
        break
      except docker.errors.NotFound:
        break
      except Exception as e:  # noqa: BLE001 - engine busy or timed out: retry, then report
        if attempt == attempts - 1:
          logging.warning("sandbox: could not remove %s (%s); the next sweep will", what, e)
        time.sleep(0.5 * (attempt + 1))


def _client():
  import docker  # imported lazily: the SDK is only needed for this backend
  return docker.from_env(timeout=120)


def _sweep_once(client) -> None:
  global _swept
  with _sweep_lock:
    if _swept:
      return
    _swept = True
  sweep(client)
  atexit.register(_sweep_own, client)


def _sweep_own(client) -> None:
  # At exit, remove this process's own leftovers (sandboxes nobody closed).
  flt = {"label": f"{LABEL}.pid={os.getpid()}"}
  try:
    for c in client.containers.list(all=True, filters=flt):
      _remove(c, None)
    for v in client.volumes.list(filters=flt):
      v.remove(force=True)
  except Exception:
    pass
