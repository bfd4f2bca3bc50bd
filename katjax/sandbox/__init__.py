"""Sandboxes: `exec(cmd, timeout) -> (output, exit_code, timed_out)`, file I/O, close.

`make_sandbox("local" | "docker", **options)` picks a backend; both share `Sandbox`.
"""

from katjax.sandbox.base import Sandbox, SandboxError, OutputCap, check_relpath

__all__ = ["Sandbox", "SandboxError", "OutputCap", "check_relpath", "make_sandbox", "BACKENDS"]

BACKENDS = ("local", "docker")


def make_sandbox(backend: str = "local", **kwargs) -> Sandbox:
  """Builds a sandbox of the named backend; ValueError for an unknown name."""
  if backend == "local":
    from katjax.sandbox.local import LocalSandbox
    return LocalSandbox(**kwargs)
  if backend == "docker":
    from katjax.sandbox.docker import DockerSandbox
    return DockerSandbox(**kwargs)
  raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")
