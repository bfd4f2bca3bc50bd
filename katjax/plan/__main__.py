"""`python -m katjax.plan --config=configs/qwen3_32b.py --mesh=1,16,8 --mesh=1,32,8`

Compiles the RL tree step and the sampler's decode step for each mesh on fake CPU devices
(no weights allocated) and prints per-device memory and which meshes fit TPU v5p (95 GiB),
H200 (141 GiB) and H100 (80 GiB). A fourth size is the `sequence` axis (context parallelism:
`--mesh=1,8,8,4` splits each tree row over 4 devices). `--device=H100` makes a row that does
not fit an error naming the largest that does.
"""

from __future__ import annotations

import math
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
_MESH = flags.DEFINE_multi_string("mesh", None, "data,fsdp,tensor[,sequence] (repeatable); "
                                  "default: the config's mesh")
_ROW = flags.DEFINE_integer("row_tokens", None, "tree row length; default data.seq_len")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", None, "decode rows; default 8 per "
                                     "data x fsdp shard")
_CACHE = flags.DEFINE_integer("cache_len", None, "decode KV cache length; default row_tokens")
_DEVICE = flags.DEFINE_string("device", None, "fail unless the row fits this device "
                              "(TPU v5p, H200, H100)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  from katjax.train.config import parse
  run = parse(config)
  meshes = [_parse_mesh(m) for m in (_MESH.value or [_config_mesh(run)])]
  need = max(math.prod(shape) for shape in meshes)
  # Fake CPU devices, set before JAX starts its backend (the plan never runs a step).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags_env = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags_env:
    os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={need}"
  import jax

  from katjax.parallel import make_mesh
  from katjax.plan.table import check_row_fits, format_plan, plan_mesh
  from katjax.train.state import make_optimizer

  cfg = run.model
  row = _ROW.value or run.data.seq_len
  micro = run.train.micro_batches
  optimizer = make_optimizer(run.optimizer)
  if jax.device_count() < need:
    raise app.UsageError(f"the largest mesh needs {need} devices, {jax.device_count()} exist "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
  t0 = time.perf_counter()
  plans = []
  for shape in meshes:
    mesh = make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])
    batch = _DECODE_BATCH.value or 8 * shape[0] * shape[1]
    t = time.perf_counter()
    plans.append(plan_mesh(cfg, mesh, row_tokens=row, micro_batches=micro, decode_batch=batch,
                           cache_len=_CACHE.value or row, optimizer=optimizer))
    print(f"# mesh {shape}: compiled in {time.perf_counter() - t:.0f} s", flush=True)
  print(format_plan(plans))
  print(f"# {len(meshes)} meshes planned in {time.perf_counter() - t0:.0f} s "
        f"({cfg.num_params() / 1e9:.2f}B params)")
  if _DEVICE.value:
    check_row_fits(plans, _DEVICE.value)


def _parse_mesh(text: str) -> tuple:
  try:
    shape = tuple(int(x) for x in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) not in (3, 4) or min(shape) < 1:
    raise app.UsageError(f"--mesh={text!r}: want three or four positive sizes "
                         f"data,fsdp,tensor[,sequence]")
  return shape


def _config_mesh(run) -> str:
  m = run.mesh
  if min(m.data, m.fsdp, m.tensor) < 1:
    raise app.UsageError(f"config.mesh {m} has a -1 size: give --mesh=data,fsdp,tensor")
  return f"{m.data},{m.fsdp},{m.tensor}" + (f",{m.sequence}" if m.sequence > 1 else "")


if __name__ == "__main__":
  app.run(main)
