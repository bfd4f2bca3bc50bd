"""Multi-host start-up: a thin, idempotent wrapper over `jax.distributed.initialize`."""

from __future__ import annotations

import os

import jax
from absl import logging

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False) -> bool:
  """Join the multi-controller runtime when launched on several hosts.

  With no arguments it initialises only when the environment looks multi-host (TPU pod,
  SLURM, or an explicit coordinator address), so single-host runs and tests are untouched.
  Returns True when `jax.distributed` was initialised by this call.
  """
  explicit = coordinator_address is not None or num_processes is not None
  if not (force or explicit or any(k in os.environ for k in _ENV_HINTS)):
    return False
  if jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True
