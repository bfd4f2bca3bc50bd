"""A persistent XLA compilation cache for tests that rebuild the same jitted programs.

A stage run builds fresh `jax.jit` closures (train step, sampler, init), so a second run in
the same process (a resume, the RFT loop after the RL loop) recompiles programs identical to
ones already compiled. JAX's persistent cache keys executables by the program itself, so with
it those runs load the executable instead. Results are unchanged: it is the same executable.
"""

from __future__ import annotations

import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def persistent_compile_cache(path: str):
  """Cache every compiled program under `path` inside the block; restore the settings after."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {n: getattr(jax.config, n) for n in names}
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for n, v in before.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()


def env(path: str) -> dict:
  """The same cache for a subprocess (environment variables JAX reads at start-up)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(path),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
