"""`--stage=export`: a stage's trained weights as a Hugging Face folder any engine can serve.

    python -m katjax.launch --stage=export --config.init_from=WORKDIR --config.export.path=DIR

Writes DIR/config.json, DIR/model.safetensors (sharded with an index when large) and
DIR/tokenizer.json. The source (`config.init_from`) is a training stage's workdir (its
latest complete checkpoint, with the architecture and tokenizer it recorded: these win over
config.model / config.tokenizer, which only matter for a HF folder without tokenizer.json) or a Hugging Face folder (re-exported, e.g. to another
dtype). `transformers` and `katjax.model.from_hf` load the folder with the same logits.
"""

from __future__ import annotations

import os

from katjax.model.hf import from_hf, to_hf
from katjax.model.tokenizer import ByteTokenizer, Tokenizer
from katjax.train import init_from
from katjax.train.config import parse


def run(config, workdir: str) -> dict:
  """Export config.init_from to config.export.path; returns {"path", "params"}."""
  run_cfg = parse(config)
  source, path = run_cfg.init_from, run_cfg.export.path
  if not source:
    raise ValueError("--stage=export needs --config.init_from=WORKDIR (a training stage's "
                     "workdir) or a Hugging Face folder")
  if not path:
    raise ValueError("--stage=export needs --config.export.path=DIR (the folder to write)")
  if os.path.abspath(path) == os.path.abspath(source):
    raise ValueError(f"config.export.path={path!r} is config.init_from itself")
  if init_from.source_kind(source) == "workdir":
    cfg = init_from.source_model_config(source)
    params = init_from.restore_params(cfg, source)
  else:
    cfg, params = from_hf(source)
  name = _tokenizer_name(source, run_cfg.tokenizer)
  tokenizer = ByteTokenizer() if name == "byte" else Tokenizer.from_file(name)
  to_hf(cfg, params, path, dtype=run_cfg.export.dtype, tokenizer=tokenizer)
  print(f"[export] {source} -> {path} ({cfg.num_params() / 1e6:.2f}M params, "
        f"{run_cfg.export.dtype}, tokenizer {name})")
  return {"path": path, "params": params, "model": cfg}


def _tokenizer_name(source: str, configured: str) -> str:
  """The source's recorded tokenizer wins (it is the one the weights were trained with)."""
  try:
    return init_from.tokenizer_of(source)
  except ValueError:
    if not configured:
      raise
    return configured
