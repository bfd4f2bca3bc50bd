"""Slurm GPU cluster: an sbatch script with one JAX process per node (all its GPUs).

    python launch/slurm.py --nodes=4 --gpus-per-node=8 [--partition=P] [--time=24:00:00] \
      [--dry-run] -- --stage=sft --config=configs/qwen3_32b.py --workdir=/shared/run1

writes the script (`--script`, default ./katjax_<stage>.sbatch) and submits it with sbatch;
`--dry-run` prints the script and the sbatch command instead. The coordinator is the job's
first node (`scontrol show hostnames`), the process id is the task's SLURM_PROCID.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

import _common

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --exclusive
{extra}set -euo pipefail
cd {repo}
# Process 0 (the coordinator) runs on the job's first node; every node runs one process.
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads it all: no SIGPIPE under pipefail
export JAX_COORDINATOR_ADDRESS="$head:{port}"
export JAX_NUM_PROCESSES="$SLURM_NNODES"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \\
  'JAX_PROCESS_ID=$SLURM_PROCID exec {command}'
"""


def render(args, katjax_args) -> str:
  stage = next((a.split("=", 1)[1] for a in katjax_args if a.startswith("--stage=")), "run")
  extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in (("partition", args.partition),
                                                     ("time", args.time)) if v)
  command = _common.launch_command(args.python, katjax_args)
  if "'" in command:
    raise ValueError(f"katjax.launch flags may not contain a single quote: {command}")
  return TEMPLATE.format(job=f"katjax-{stage}", nodes=args.nodes, gpus=args.gpus_per_node,
                         extra=extra, repo=shlex.quote(args.repo), port=args.port,
                         command=command)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--nodes", type=int, required=True)
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--partition", default="")
  parser.add_argument("--time", default="")
  parser.add_argument("--repo", default=".", help="katjax checkout on the nodes")
  parser.add_argument("--port", type=int, default=_common.DEFAULT_PORT)
  parser.add_argument("--python", default="python3")
  parser.add_argument("--script", default="")
  args, katjax_args = _common.parse(parser, argv)
  if args.nodes < 1:
    parser.error(f"--nodes must be >= 1, got {args.nodes}")
  script = render(args, katjax_args)
  stage = next((a.split("=", 1)[1] for a in katjax_args if a.startswith("--stage=")), "run")
  path = args.script or f"katjax_{stage}.sbatch"
  if args.dry_run:
    print(script, end="")
    print(f"# would run: sbatch {path}")
    return 0
  with open(path, "w", encoding="utf-8") as f:
    f.write(script)
  return subprocess.call(["sbatch", path])


if __name__ == "__main__":
  raise SystemExit(main())
