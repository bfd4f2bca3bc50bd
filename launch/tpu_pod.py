"""TPU pod slice: the same command on every worker of a TPU VM slice.

    python launch/tpu_pod.py --tpu=NAME --zone=ZONE [--project=P] [--repo=DIR] [--dry-run] \
      -- --stage=sft --config=configs/qwen3_32b.py --workdir=gs://BUCKET/run1

runs `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...` so that every host
starts `python -m katjax.launch ...` at once. JAX reads the pod's metadata itself
(`katjax.parallel.initialize`): coordinator, process id and count need no flags.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess

import _common


def build(args, katjax_args) -> list[str]:
  remote = f"cd {shlex.quote(args.repo)} && " + _common.launch_command(args.python,
                                                                        katjax_args)
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
         "--worker=all", f"--command={remote}"]
  if args.project:
    cmd.insert(7, f"--project={args.project}")
  return cmd


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tpu", required=True, help="TPU VM (slice) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="")
  parser.add_argument("--repo", default="katjax",
                      help="katjax checkout on every worker (relative: to the login home)")
  parser.add_argument("--python", default="python3")
  args, katjax_args = _common.parse(parser, argv)
  cmd = build(args, katjax_args)
  if args.dry_run:
    print(shlex.join(cmd))
    return 0
  return subprocess.call(cmd)


if __name__ == "__main__":
  raise SystemExit(main())
