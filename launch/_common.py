"""Shared by the launchers: split their own flags from the katjax.launch flags after `--`."""

from __future__ import annotations

import argparse
import shlex
import sys

DEFAULT_PORT = 8476  # the JAX coordinator's port on process 0's host


def parse(parser: argparse.ArgumentParser, argv=None):
  """-> (launcher args, katjax.launch argv). Everything after `--` goes to katjax.launch."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    i = argv.index("--")
    own, rest = argv[:i], argv[i + 1:]
  else:
    own, rest = argv, []
  parser.add_argument("--dry-run", action="store_true",
                      help="print what would be started, start nothing")
  args = parser.parse_args(own)
  if not any(a.startswith("--stage") for a in rest):
    parser.error("give the katjax.launch flags after `--`, e.g. -- --stage=sft "
                 "--config=configs/qwen3_32b.py --workdir=...")
  if not any(a.startswith("--workdir") for a in rest):
    parser.error("multi-host runs need --workdir=... on storage every host sees (a shared "
                 "filesystem or a gs:// bucket): checkpoints are written by all hosts")
  return args, rest


def launch_command(python: str, katjax_args) -> str:
  """The command every host runs: the unchanged single-host launcher."""
  return shlex.join([python, "-m", "katjax.launch", *katjax_args])
