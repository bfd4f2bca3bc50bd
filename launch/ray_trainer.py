"""Ray cluster: the trainer as one JAX process per host, each a Ray actor.

    python launch/ray_trainer.py --hosts=4 --gpus-per-host=8 [--address=auto] [--dry-run] \
      -- --stage=rl --config=configs/qwen3_32b.py --workdir=/shared/run1

A placement group puts one bundle on each of `--hosts` nodes (STRICT_SPREAD); actor 0 picks
a free port on its node and publishes `ip:port` as the coordinator address; every actor i
then runs the unchanged `python -m katjax.launch ...` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID=i. Rollout workers of the flow (tagged Ray resources)
can share the cluster: the trainer's bundles ask only for `--resource` (default GPU).
`--dry-run` prints the plan without importing Ray.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import _common


def plan(args, katjax_args) -> list[str]:
  bundle = {args.resource: args.gpus_per_host, "CPU": args.cpus_per_host}
  lines = [f"ray.init(address={args.address!r})",
           f"placement group: {args.hosts} bundles {bundle}, strategy STRICT_SPREAD",
           "actor 0 publishes the coordinator address <actor 0 node ip>:<free port>"]
  command = _common.launch_command(args.python, katjax_args)
  for i in range(args.hosts):
    lines.append(f"actor {i}: JAX_COORDINATOR_ADDRESS=<actor 0 ip:port> "
                 f"JAX_NUM_PROCESSES={args.hosts} JAX_PROCESS_ID={i} {command}")
  return lines


class TrainerProcess:
  """One host's JAX process (the body of the Ray actor)."""

  def coordinator_address(self) -> str:
    with socket.socket() as s:
      s.bind(("", 0))
      port = s.getsockname()[1]
    import ray
    return f"{ray.util.get_node_ip_address()}:{port}"

  def run(self, coordinator: str, num: int, index: int, command: list[str], cwd: str) -> int:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num),
               JAX_PROCESS_ID=str(index))
    return subprocess.call(command, env=env, cwd=cwd)


def run(args, katjax_args) -> int:
  import ray
  from ray.util.placement_group import placement_group
  from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

  ray.init(address=args.address)
  bundle = {args.resource: args.gpus_per_host, "CPU": args.cpus_per_host}
  pg = placement_group([dict(bundle) for _ in range(args.hosts)], strategy="STRICT_SPREAD")
  ray.get(pg.ready())
  actor_cls = ray.remote(TrainerProcess)
  actors = [actor_cls.options(
      num_cpus=args.cpus_per_host, resources={args.resource: args.gpus_per_host}
      if args.resource != "GPU" else None,
      num_gpus=args.gpus_per_host if args.resource == "GPU" else 0,
      scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
  ).remote() for i in range(args.hosts)]
  coordinator = ray.get(actors[0].coordinator_address.remote())
  print(f"ray_trainer: coordinator {coordinator}, {args.hosts} processes")
  command = [args.python, "-m", "katjax.launch", *katjax_args]
  codes = ray.get([a.run.remote(coordinator, args.hosts, i, command, args.repo)
                   for i, a in enumerate(actors)])
  return max(codes)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hosts", type=int, required=True, help="JAX processes (one per node)")
  parser.add_argument("--gpus-per-host", type=int, default=8)
  parser.add_argument("--cpus-per-host", type=int, default=8)
  parser.add_argument("--resource", default="GPU",
                      help="accelerator resource per bundle (GPU, TPU, or a custom tag)")
  parser.add_argument("--address", default="auto", help="Ray cluster address")
  parser.add_argument("--repo", default=os.getcwd(), help="katjax checkout on every node")
  parser.add_argument("--python", default=sys.executable)
  args, katjax_args = _common.parse(parser, argv)
  if args.hosts < 1:
    parser.error(f"--hosts must be >= 1, got {args.hosts}")
  if args.dry_run:
    print("\n".join(plan(args, katjax_args)))
    return 0
  return run(args, katjax_args)


if __name__ == "__main__":
  raise SystemExit(main())
