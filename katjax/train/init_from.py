"""Start training from a Hugging Face folder (`config.init_from`) instead of random weights.

The run's `config.model` must describe the checkpoint's architecture: a mismatch is a
ValueError naming every disagreeing field, raised from config.json alone before any weight is
read. Fields that only say how to run the model (compute dtype, remat, attention kernel)
are the run's own and are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from katjax import model as kmodel
from katjax.model import hf

# ModelConfig fields a checkpoint does not fix: how this run computes, not what it computes.
RUNTIME_FIELDS = ("dtype", "remat", "scan_unroll", "attention_impl", "attention_block",
                  "dense_max_len")


def init_from_path(config) -> str:
  """`config.init_from`, "" when unset (configs written before the field existed)."""
  return config.get("init_from", "") or ""


def check_matches(cfg: kmodel.ModelConfig, path: str) -> None:
  """ValueError unless `cfg` agrees with `path`/config.json on every architecture field."""
  config_json = os.path.join(path, "config.json")
  if not os.path.isfile(config_json):
    raise ValueError(f"config.init_from: {path!r} has no config.json (expected a Hugging "
                     f"Face folder, e.g. written by third_party/smollm2/convert.py)")
  with open(config_json) as f:
    theirs = hf.config_from_hf(json.load(f))
  # head_dim=None means d_model // n_heads; a checkpoint always states it.
  ours = cfg.replace(head_dim=cfg.dim_per_head)
  diffs = [f"config.model.{f.name}={getattr(ours, f.name)!r} but the checkpoint has "
           f"{getattr(theirs, f.name)!r}"
           for f in dataclasses.fields(ours)
           if f.name not in RUNTIME_FIELDS
           and not _same(getattr(ours, f.name), getattr(theirs, f.name))]
  if diffs:
    raise ValueError(f"config.init_from={path!r} does not match config.model: " +
                     "; ".join(diffs))


def _same(a, b) -> bool:
  # Float fields may have been stored as float32 (GGUF -> config.json: 1e-5 reads back as
  # 9.9999997e-06): equal up to float32 rounding.
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def load_params(cfg: kmodel.ModelConfig, path: str, mesh) -> dict:
  """float32 params of `path`, each device reading only its own shard for `mesh`."""
  check_matches(cfg, path)
  _, params = hf.from_hf(path, mesh=mesh)
  return params
