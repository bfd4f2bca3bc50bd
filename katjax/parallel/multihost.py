"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`).

Every host runs the same command (`python -m katjax.launch ...`); `initialize()` joins the
job from what the environment says:

- explicit: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID` (what the launchers in `launch/` set), or the same as arguments;
- a TPU pod slice or a Slurm job step: JAX's own cluster detection (pod metadata, SLURM_*).

A single process with none of these is left alone, so one-box runs and tests are untouched.
A coordinator that cannot be reached is a `TimeoutError` naming its address (JAX itself
aborts the process without a Python error), and `check_same_config` makes every process
compare its config with process 0's before any step, naming the first fields that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging

_AUTO_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
DEFAULT_TIMEOUT_S = 300


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float | None = None,
               force: bool = False) -> bool:
  """Join the multi-controller runtime when launched as several processes.

  Arguments override `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`;
  `timeout_s` (default `KATJAX_INIT_TIMEOUT` or 300) bounds the wait for the coordinator.
  Returns True when `jax.distributed` was initialised by this call.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _int_or_none("JAX_NUM_PROCESSES", num_processes)
  process_id = _int_or_none("JAX_PROCESS_ID", process_id)
  timeout_s = float(env.get("KATJAX_INIT_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None \
      else float(timeout_s)
  slurm_multi = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1
  explicit = coordinator_address is not None or num_processes is not None
  if not (force or explicit or slurm_multi or any(k in env for k in _AUTO_HINTS)):
    return False
  if jax.distributed.is_initialized():
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError(
        "multi-host start needs all three of coordinator address, process count and process "
        f"id; got JAX_COORDINATOR_ADDRESS={coordinator_address!r}, "
        f"JAX_NUM_PROCESSES={num_processes!r}, JAX_PROCESS_ID={process_id!r}")
  if explicit and not 0 <= process_id < num_processes:
    raise ValueError(f"JAX_PROCESS_ID={process_id} is outside [0, JAX_NUM_PROCESSES="
                     f"{num_processes})")
  t0 = time.monotonic()
  if coordinator_address is not None and process_id != 0:
    # JAX aborts the whole process (no Python error) when the coordinator never answers.
    wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
  remaining = max(1, int(timeout_s - (time.monotonic() - t0)))
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=remaining)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def wait_for_coordinator(address: str, timeout_s: float, process_id=None,
                         num_processes=None) -> None:
  """Poll a TCP connection to `address` (host:port) until it answers or `timeout_s` passes."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      who = "" if process_id is None else f" (process {process_id} of {num_processes})"
      raise TimeoutError(
          f"could not reach the JAX coordinator at {address} within {timeout_s:g} s{who}: "
          f"{last}. Is process 0 running there, and is the port open? (timeout: "
          f"KATJAX_INIT_TIMEOUT)")
    time.sleep(0.25)


def is_main_process() -> bool:
  """True on process 0: the one that writes metrics, progress bars and summaries."""
  return jax.process_index() == 0


def check_same_config(config, *, timeout_s: float = 120.0) -> None:
  """Raise ValueError on every process when any process's config differs from process 0's.

  Each process publishes a hash of its flattened config in the coordinator's key-value
  store; process 0 compares them and publishes a verdict naming the differing fields.
  A no-op in a single process.
  """
  client = _client()
  if client is None or jax.process_count() == 1:
    return
  flat = flatten_config(config)
  text = json.dumps(flat, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()
  me, n = jax.process_index(), jax.process_count()
  client.key_value_set(f"katjax/config/{me}/hash", digest)
  client.key_value_set(f"katjax/config/{me}/json", text)
  ms = int(timeout_s * 1000)
  if me == 0:
    verdict = "ok"
    for p in range(1, n):
      if client.blocking_key_value_get(f"katjax/config/{p}/hash", ms) != digest:
        other = json.loads(client.blocking_key_value_get(f"katjax/config/{p}/json", ms))
        verdict = describe_config_difference(flat, other, p)
        break
    client.key_value_set("katjax/config/verdict", verdict)
  else:
    verdict = client.blocking_key_value_get("katjax/config/verdict", ms)
  if verdict != "ok":
    raise ValueError(verdict)


def flatten_config(config) -> dict:
  """{dotted.field: JSON-able value} of a ConfigDict / dict (the unit configs are compared in)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = json.loads(json.dumps(node, default=str))

  visit("", config)
  return out


def describe_config_difference(ref: dict, other: dict, process: int) -> str:
  """Message naming the fields where process `process`'s flat config differs from `ref`."""
  missing = object()
  fields = sorted(k for k in set(ref) | set(other) if ref.get(k, missing) != other.get(k, missing))
  shown = "; ".join(f"{k} = {other.get(k, '<absent>')!r} on process {process}, "
                    f"{ref.get(k, '<absent>')!r} on process 0" for k in fields[:5])
  more = f" (and {len(fields) - 5} more)" if len(fields) > 5 else ""
  return (f"processes were started with different configs: {shown}{more}. Every host must "
          f"run the same command and config file")


def process_allgather_np(x) -> np.ndarray:
  """Host numpy copy of a (possibly multi-host sharded) array, on every process."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _client():
  from jax._src import distributed  # the coordinator's key-value store has no public alias
  return distributed.global_state.client


def _int_or_none(name: str, value):
  if value is not None:
    return int(value)
  raw = os.environ.get(name)
  if raw in (None, ""):
    return None
  try:
    return int(raw)
  except ValueError as e:
    raise ValueError(f"{name}={raw!r} is not an integer") from e
