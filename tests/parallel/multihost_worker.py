"""One process of a multi-process CPU run (started by tests/parallel/test_multihost.py).

argv[1]: JSON {"config": {field: value overrides of configs/tiny.py}, "jobs": [[name,
workdir, steps, copy_from or null], ...], "out": dir}. Joins the job exactly as `katjax.launch` does
(`initialize()` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then
`check_same_config`), runs the unchanged mid-training stage for each job (a job whose workdir
holds a checkpoint resumes it), and process 0 writes `<out>/<name>.npz`: the logged losses
and every parameter gathered to the host.
"""

import importlib.util
import json
import os
import shutil
import sys

import jax
import numpy as np

from katjax.parallel import (check_same_config, initialize, is_main_process,
                             process_allgather_np)


def main(spec):
  initialize()
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")
  module = importlib.util.spec_from_file_location("tiny_config", path)
  tiny = importlib.util.module_from_spec(module)
  module.loader.exec_module(tiny)
  config = tiny.get_config()
  for key, value in spec["config"].items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  check_same_config(config)
  if not spec["jobs"]:
    print("configs agree")
  from katjax.stages import mid
  for name, workdir, steps, copy_from in spec["jobs"]:
    if copy_from:  # resume a copy of another job's checkpoint (single-process runs only)
      shutil.copytree(copy_from, workdir)
    config.train.steps = steps
    summary = mid.run(config, workdir)
    flat = jax.tree_util.tree_flatten_with_path(summary["state"].params)[0]
    params = {jax.tree_util.keystr(k): process_allgather_np(v) for k, v in flat}
    if is_main_process():
      losses = summary["losses"]
      np.savez(os.path.join(spec["out"], f"{name}.npz"),
               loss_steps=np.asarray(sorted(losses)),
               losses=np.asarray([losses[k] for k in sorted(losses)]),
               devices=jax.device_count(), processes=jax.process_count(), **params)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
