"""Serve a model over the OpenAI-compatible HTTP API: `--stage=serve`.

    python -m katjax.launch --stage=serve --config=configs/serve.py \
        --config.serve.checkpoint=/path/to/hf_folder --config.serve.port=8000

`config.serve.checkpoint`: a Hugging Face folder (config.json + safetensors, read by
`katjax.model.from_hf`), a `.gguf` file, a training stage's workdir (its latest checkpoint),
or "" for `config.init_from` (any of those) or, when that is empty too, random weights of
`config.model` (smoke tests). Binds to 127.0.0.1 unless `config.serve.host` says otherwise.
`config.serve.duration_s > 0` stops the server after that many seconds (tests, demos).
`config.serve.max_len` 0 (the default) serves the model's own context (`max_position_embeddings`
of a Hugging Face folder, `<arch>.context_length` of a GGUF file; 2048 otherwise). The
serve.* fields and their defaults are declared once, in katjax/train/config.py.
"""

from __future__ import annotations

import os
import time

import jax

from katjax.stages.common import make_tokenizer
from katjax.train.config import parse


def run(config, workdir: str) -> dict:
  """Builds the sampler from config.model / config.serve and serves until stopped."""
  from katjax.rollout.sampler import Sampler
  from katjax.rollout.server import serve

  run_cfg = parse(config)
  opts = run_cfg.serve
  cfg, params, tokenizer = _load(config, run_cfg)
  mesh = None
  if jax.device_count() > 1:
    from katjax.parallel import make_mesh
    mesh = make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor,
                     sequence=run_cfg.mesh.sequence)
  max_len = opts.max_len or _context(run_cfg.serve.checkpoint or run_cfg.init_from)
  sampler = Sampler(cfg, params, max_len=max_len, tokenizer=tokenizer, mesh=mesh,
                    max_batch=opts.max_batch, chunk=opts.chunk)
  server = serve(sampler, tokenizer, host=opts.host, port=opts.port,
                 model_name=opts.model_name, max_batch=opts.max_batch,
                 max_queue=opts.max_queue)
  print(f"[serve] {opts.model_name} ({cfg.num_params() / 1e6:.1f}M params) at "
        f"{server.url}/v1 (POST /chat/completions, /completions; GET /models, /health)",
        flush=True)
  try:
    if opts.duration_s > 0:
      time.sleep(opts.duration_s)
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


def _context(ckpt: str) -> int:
  """The model's own context length: `max_position_embeddings` of a Hugging Face folder,
  `<arch>.context_length` of a GGUF file; 2048 when the source does not say."""
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


def _load(config, run_cfg):
  """(cfg, params, tokenizer) of serve.checkpoint, else init_from, else random weights."""
  ckpt = run_cfg.serve.checkpoint or run_cfg.init_from
  if not ckpt:
    from katjax.model import init
    return (run_cfg.model, init(run_cfg.model, jax.random.PRNGKey(run_cfg.serve.seed)),
            make_tokenizer(config))
  if ckpt.endswith(".gguf"):
    from katjax.model.gguf import from_gguf
    return from_gguf(ckpt)
  from katjax.train import init_from
  if init_from.source_kind(ckpt) == "workdir":  # a training stage's latest checkpoint
    cfg = init_from.source_model_config(ckpt)
    params = init_from.restore_params(cfg, ckpt)
  else:
    from katjax.model.hf import from_hf
    cfg, params = from_hf(ckpt)
  return cfg, params, _source_tokenizer(config, ckpt)


def _source_tokenizer(config, source: str):
  """The tokenizer recorded by the source (workdir or HF folder), else config.tokenizer's."""
  from katjax.model.tokenizer import ByteTokenizer, Tokenizer
  from katjax.train.init_from import tokenizer_of
  try:
    name = tokenizer_of(source)
  except ValueError:
    return make_tokenizer(config)
  return ByteTokenizer() if name == "byte" else Tokenizer.from_file(name)
