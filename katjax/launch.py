"""Launcher: `python -m katjax.launch --stage=NAME --config=configs/X.py --workdir=DIR`.

Dispatches to `katjax.stages.NAME.run(config, workdir)`. `--config` is an ml_collections
config file built on `katjax.train.config.base_config()` (`--config.train.steps=10`
overrides a field; a misspelt or mistyped field is an error that names it).
`--config.init_from=DIR` starts a stage from a previous stage's workdir or a Hugging Face
folder; `--stage=export --config.init_from=WORKDIR --config.export.path=DIR` writes one. With no flags it runs the demo: SFT of the tiny config on the embedded data in a
fresh temporary workdir.
"""

from __future__ import annotations

import importlib
import os
import tempfile

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tiny.py")

_STAGE = flags.DEFINE_string("stage", "sft", "stage module under katjax.stages (mid, sft, ...)")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints and logs; default: a new temp dir")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "ml_collections config file", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from katjax.parallel import initialize
  initialize()
  stage = _STAGE.value
  try:
    module = importlib.import_module(f"katjax.stages.{stage}")
  except ModuleNotFoundError as e:
    raise app.UsageError(f"unknown --stage={stage!r} (no module katjax.stages.{stage})") from e
  if not hasattr(module, "run"):
    raise app.UsageError(f"katjax.stages.{stage} has no run(config, workdir)")
  from katjax.train.config import parse
  try:
    parse(_CONFIG.value)  # the one validation: every field known and of its declared type
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix=f"katjax_{stage}_")
  os.makedirs(workdir, exist_ok=True)
  print(f"katjax.launch: stage={stage} config={flags.FLAGS['config'].config_filename} "
        f"workdir={workdir}")
  module.run(_CONFIG.value, workdir)


if __name__ == "__main__":
  app.run(main)
