"""Serve a model over the OpenAI-compatible HTTP API: `--stage=serve`.

    python -m katjax.launch --stage=serve --config=configs/serve.py \
        --config.serve.checkpoint=/path/to/hf_folder --config.serve.port=8000

`config.serve.checkpoint`: a Hugging Face folder (config.json + safetensors, read by
`katjax.model.from_hf`), a `.gguf` file, or "" for random weights of `config.model` (smoke
tests). Binds to 127.0.0.1 unless `config.serve.host` says otherwise.
`config.serve.duration_s > 0` stops the server after that many seconds (tests, demos).
`config.serve.max_len` 0 (the default) serves the model's own context (`max_position_embeddings`
of a Hugging Face folder, `<arch>.context_length` of a GGUF file; 2048 for random weights).
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from katjax.model.config import ModelConfig
from katjax.stages.common import make_tokenizer

DEFAULTS = dict(checkpoint="", host="127.0.0.1", port=8000, model_name="katjax",
                max_len=0, max_batch=16, max_queue=64, chunk=32, duration_s=0.0, seed=0)


def run(config, workdir: str) -> dict:
  """Builds the sampler from config.model / config.serve and serves until stopped."""
  from katjax.rollout.sampler import Sampler
  from katjax.rollout.server import serve

  opts = dict(DEFAULTS)
  opts.update(dict(config.get("serve", ml_collections.ConfigDict())))
  unknown = sorted(set(opts) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.serve: unknown fields {unknown}; known: {sorted(DEFAULTS)}")
  cfg, params, tokenizer = _load(config, opts)
  mesh = None
  if "mesh" in config and jax.device_count() > 1:
    from katjax.parallel import make_mesh
    mesh = make_mesh(**dict(config.mesh))
  max_len = opts["max_len"] or _context(opts["checkpoint"])
  sampler = Sampler(cfg, params, max_len=max_len, tokenizer=tokenizer, mesh=mesh,
                    max_batch=opts["max_batch"], chunk=opts["chunk"])
  server = serve(sampler, tokenizer, host=opts["host"], port=opts["port"],
                 model_name=opts["model_name"], max_batch=opts["max_batch"],
                 max_queue=opts["max_queue"])
  print(f"[serve] {opts['model_name']} ({cfg.num_params() / 1e6:.1f}M params) at "
        f"{server.url}/v1 (POST /chat/completions, /completions; GET /models, /health)",
        flush=True)
  try:
    if opts["duration_s"] > 0:
      time.sleep(opts["duration_s"])
    else:
      while True:
        time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    stats = server.engine.snapshot()
    server.close()
  print(f"[serve] stopped: {stats}")
  return {"url": server.url, "stats": stats}


def _context(ckpt) -> int:
  """The model's own context length (2048 when the checkpoint does not say)."""
  try:
    if ckpt.endswith(".gguf"):
      from gguf import GGUFReader
      fields = GGUFReader(ckpt).fields
      arch = bytes(fields["general.architecture"].parts[-1]).decode()
      return int(fields[f"{arch}.context_length"].parts[-1][0])
    if ckpt:
      import json
      with open(os.path.join(ckpt, "config.json")) as f:
        return int(json.load(f)["max_position_embeddings"])
  except (KeyError, OSError, ValueError):
    pass
  return 2048


def _load(config, opts):
  ckpt = opts["checkpoint"]
  if not ckpt:
    cfg = ModelConfig(**dict(config.model))
    from katjax.model import init
    return cfg, init(cfg, jax.random.PRNGKey(opts["seed"])), make_tokenizer(config)
  if ckpt.endswith(".gguf"):
    from katjax.model.gguf import from_gguf
    return from_gguf(ckpt)
  if not os.path.isdir(ckpt):
    raise ValueError(f"config.serve.checkpoint {ckpt!r} is neither a .gguf file nor a folder")
  from katjax.model.hf import from_hf
  from katjax.model.tokenizer import Tokenizer
  cfg, params = from_hf(ckpt)
  tok_file = os.path.join(ckpt, "tokenizer.json")
  tokenizer = Tokenizer.from_file(tok_file) if os.path.isfile(tok_file) else make_tokenizer(
      config)
  return cfg, params, tokenizer
