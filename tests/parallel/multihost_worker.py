"""One process of a multi-process CPU run (started by tests/parallel/test_multihost.py).

argv[1]: JSON {"config": {field: value overrides of the base config}, "jobs": [[name,
workdir, steps, copy_from or null], ...], "out": dir, "stage": "mid" (default) or "rl"}.
The base config is configs/tiny.py for mid-training and configs/rl_tiny.py for RL. Joins the
job exactly as `katjax.launch` does (`initialize()` from JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, then `check_same_config`), runs the unchanged stage for
each job (a job whose workdir holds a checkpoint resumes it), and process 0 writes
`<out>/<name>.npz`: the logged losses and every parameter gathered to the host.

RL: a random tiny model never earns a reward, so every advantage would be 0 and nothing
would train. The worker replaces each rollout's reward by a fixed function of its tokens:
identical episodes get identical rewards on any process layout, and any difference in the
episodes shows up in the losses.
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

BASES = {"mid": "tiny.py", "rl": "rl_tiny.py"}


def token_reward(rollout) -> float:
  """A reward in [0, 1) that depends only on the episode's generated tokens."""
  generated = np.asarray(rollout.tokens)[np.asarray(rollout.loss_mask) > 0]
  return float(int(np.sum(generated.astype(np.int64) * np.arange(1, generated.size + 1))) % 101
               ) / 101.0


def main(spec):
  initialize()
  stage = spec.get("stage", "mid")
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", BASES[stage])
  module = importlib.util.spec_from_file_location("base_config", path)
  base = importlib.util.module_from_spec(module)
  module.loader.exec_module(base)
  config = base.get_config()
  for key, value in spec["config"].items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  check_same_config(config)
  if not spec["jobs"]:
    print("configs agree")
  if stage == "rl":
    from katjax.stages import rl as stage_module
    episodes = stage_module.run_episodes

    def run_episodes(*args, **kwargs):
      rollouts = episodes(*args, **kwargs)
      for r in rollouts:
        r.reward = token_reward(r)
      return rollouts

    stage_module.run_episodes = run_episodes
  else:
    from katjax.stages import mid as stage_module
  for name, workdir, steps, copy_from in spec["jobs"]:
    if copy_from:  # resume a copy of another job's checkpoint (single-process runs only)
      shutil.copytree(copy_from, workdir)
    config.train.steps = steps
    summary = stage_module.run(config, workdir)
    flat = jax.tree_util.tree_flatten_with_path(summary["state"].params)[0]
    params = {jax.tree_util.keystr(k): process_allgather_np(v) for k, v in flat}
    if is_main_process():
      losses = summary["losses"] if stage == "mid" else summary["loss"]
      extra = {}
      if stage == "rl":
        extra["rewards"] = np.asarray([summary["reward_mean"][k] for k in sorted(losses)])
      np.savez(os.path.join(spec["out"], f"{name}.npz"),
               loss_steps=np.asarray(sorted(losses)),
               losses=np.asarray([losses[k] for k in sorted(losses)]),
               devices=jax.device_count(), processes=jax.process_count(), **params, **extra)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
