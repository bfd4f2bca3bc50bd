"""Start a stage from `config.init_from`: a previous stage's workdir or a Hugging Face folder.

- A workdir (it has `checkpoints/`): the params of its latest complete orbax checkpoint;
  the optimizer state, step and data position are left behind (the new stage starts at
  step 0 with a fresh optimizer).
- A Hugging Face folder (it has `config.json`): its safetensors, each device reading only
  its own shard.

Either way the run's `config.model` must describe the source's architecture: a mismatch is
a ValueError naming every disagreeing field, raised from the source's recorded config alone
before any weight is read. Fields that only say how to run the model (compute dtype, remat,
attention kernel) are the run's own and are not compared. A stage whose own workdir already
has a checkpoint resumes from it instead (the trainer decides; init_from is then unused).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

import jax
import orbax.checkpoint as ocp

from katjax import model as kmodel
from katjax.model import hf

# ModelConfig fields a checkpoint does not fix: how this run computes, not what it computes.
RUNTIME_FIELDS = ("dtype", "remat", "scan_unroll", "attention_impl", "attention_block",
                  "dense_max_len")
CHECKPOINTS = "checkpoints"  # a workdir's orbax directory


def source_kind(path: str) -> str:
  """"workdir" or "hf" for a valid init_from path; ValueError saying what is missing."""
  if not os.path.isdir(path):
    raise ValueError(f"config.init_from={path!r} does not exist (expected a previous stage's "
                     f"workdir or a Hugging Face folder)")
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    if latest_step(path) is None:
      raise ValueError(f"config.init_from={path!r} is a workdir with no complete checkpoint "
                       f"in {os.path.join(path, CHECKPOINTS)} (did its stage save one?)")
    return "workdir"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  raise ValueError(f"config.init_from={path!r} has no config.json and no {CHECKPOINTS}/ "
                   f"(expected a Hugging Face folder, e.g. written by --stage=export or "
                   f"third_party/smollm2/convert.py, or a previous stage's workdir)")


def latest_step(workdir: str) -> int | None:
  """Newest complete checkpoint step under workdir/checkpoints (orbax skips partial ones)."""
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
  if not os.path.isdir(directory):
    return None
  mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def saved_config(workdir: str) -> dict:
  """The config (JSON dict) recorded with the workdir's latest complete checkpoint."""
  step = latest_step(workdir)
  path = os.path.join(os.path.abspath(workdir), CHECKPOINTS, str(step), "config")
  files = [f for f in os.listdir(path) if not f.startswith("_")] if os.path.isdir(path) else []
  if not files:
    raise ValueError(f"config.init_from={workdir!r}: checkpoint {step} has no recorded config")
  with open(os.path.join(path, files[0])) as f:
    return json.load(f)


def source_model_config(path: str) -> kmodel.ModelConfig:
  """The architecture recorded by `path` (a workdir's checkpoint config or config.json)."""
  if source_kind(path) == "hf":
    with open(os.path.join(path, "config.json")) as f:
      return hf.config_from_hf(json.load(f))
  fields = {f.name for f in dataclasses.fields(kmodel.ModelConfig)}
  saved = saved_config(path).get("model", {})
  return kmodel.ModelConfig(**{k: v for k, v in saved.items() if k in fields})


def check_matches(cfg: kmodel.ModelConfig, path: str) -> None:
  """ValueError unless `cfg` agrees with the source at `path` on every architecture field."""
  theirs = source_model_config(path)
  # head_dim=None means d_model // n_heads: compare what it means.
  ours = cfg.replace(head_dim=cfg.dim_per_head)
  theirs = theirs.replace(head_dim=theirs.dim_per_head)
  diffs = [f"config.model.{f.name}={getattr(ours, f.name)!r} but the checkpoint has "
           f"{getattr(theirs, f.name)!r}"
           for f in dataclasses.fields(ours)
           if f.name not in RUNTIME_FIELDS
           and not _same(getattr(ours, f.name), getattr(theirs, f.name))]
  if diffs:
    raise ValueError(f"config.init_from={path!r} does not match config.model: " +
                     "; ".join(diffs))


def load_params(cfg: kmodel.ModelConfig, path: str, mesh) -> dict:
  """float32 params of `path` (workdir or HF folder), sharded for `mesh` as the run's are."""
  check_matches(cfg, path)
  if source_kind(path) == "hf":
    _, params = hf.from_hf(path, mesh=mesh)
    return params
  return restore_params(cfg, path, mesh)


def restore_params(cfg: kmodel.ModelConfig, workdir: str, mesh=None, step: int | None = None):
  """Only the params of a workdir's checkpoint (default: latest complete step)."""
  from katjax.parallel import param_shardings
  step = latest_step(workdir) if step is None else step
  shapes = kmodel.param_shapes(cfg)
  if mesh is not None:
    shardings = param_shardings(kmodel.logical_axes(cfg), shapes, mesh)
  else:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, shapes)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
  state_dir = os.path.join(os.path.abspath(workdir), CHECKPOINTS, str(step), "state")
  restore_args = {"params": ocp.checkpoint_utils.construct_restore_args(target)}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item={"params": target}, restore_args=restore_args, partial_restore=True))
  return restored["params"]


def _same(a, b) -> bool:
  # Float fields may have been stored as float32 (GGUF -> config.json: 1e-5 reads back as
  # 9.9999997e-06): equal up to float32 rounding.
  if isinstance(a, float) or isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


# --- the tokenizer travels with the checkpoint ----------------------------------------------

TOKENIZER_FILE = "tokenizer.json"  # a workdir's copy of its (non-byte) tokenizer


def make_tokenizer(run, workdir: str | None = None):
  """The run's tokenizer, recorded in `workdir` so later stages and exports find it.

  run.tokenizer: "byte" (ByteTokenizer), a tokenizer.json path, or "" = the tokenizer of
  run.init_from (a workdir's recorded one, or the tokenizer.json beside HF weights). A
  resumed run with "" uses its own workdir's copy. A tokenizer.json is copied to
  workdir/tokenizer.json; "byte" is recorded in each checkpoint's config (`tokenizer_spec`).
  """
  from katjax.model.tokenizer import ByteTokenizer, Tokenizer
  name = run.tokenizer
  if name == "":
    own = os.path.join(workdir, TOKENIZER_FILE) if workdir else ""
    if own and os.path.isfile(own):
      name = own
    elif not run.init_from:
      raise ValueError('config.tokenizer="" means "the tokenizer of config.init_from", but '
                       'config.init_from is empty: set --config.tokenizer=byte or a path')
    else:
      name = tokenizer_of(run.init_from)
  if name == "byte":
    tok = ByteTokenizer()
  elif os.path.isfile(name) or os.path.isdir(name):
    tok = Tokenizer.from_file(name)
  else:
    raise ValueError(f"config.tokenizer: {name!r} is neither 'byte', '' nor an existing "
                     f"tokenizer.json path")
  if workdir and isinstance(tok, Tokenizer):
    target = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(target) or not os.path.samefile(target, name):
      os.makedirs(workdir, exist_ok=True)
      # Every host of a multi-host run records it in the shared workdir: each writes its own
      # file and renames it over the target, so no host reads a half-written tokenizer.
      fd, tmp = tempfile.mkstemp(dir=workdir, prefix=TOKENIZER_FILE + ".", suffix=".tmp")
      os.close(fd)
      tok.hf.save(tmp)
      os.replace(tmp, target)
  return tok


def tokenizer_of(path: str) -> str:
  """"byte" or the tokenizer.json path of an init_from source (ValueError when it has none)."""
  kind = source_kind(path)
  own = os.path.join(path, TOKENIZER_FILE)
  if os.path.isfile(own):
    return own
  if kind == "workdir" and saved_config(path).get("tokenizer") == "byte":
    return "byte"
  raise ValueError(f'config.tokenizer="" but config.init_from={path!r} records no tokenizer '
                   f"(no {TOKENIZER_FILE}" +
                   (", and its checkpoint's config.tokenizer is not 'byte')" if kind ==
                    "workdir" else ")") + ": set --config.tokenizer")


def tokenizer_spec(tokenizer) -> str:
  """What a checkpoint records as its tokenizer: "byte" or the workdir's tokenizer.json."""
  from katjax.model.tokenizer import ByteTokenizer
  return "byte" if isinstance(tokenizer, ByteTokenizer) else TOKENIZER_FILE
