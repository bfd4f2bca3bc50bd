"""Serving config: the tiny model (random weights unless serve.checkpoint is set) on loopback.

    python -m katjax.launch --stage=serve --config=configs/serve.py \
        --config.serve.checkpoint=/tmp/smollm2-hf --config.serve.port=8000

The serve.* fields and their defaults are declared in katjax/train/config.py (ServeConfig).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402


def get_config():
  c = tiny.get_config()
  c.serve.update(checkpoint="", host="127.0.0.1", port=8000)
  return c
