"""Hugging Face checkpoints in and out: Llama, Qwen2, Qwen3 (config.json + safetensors).

`from_hf(path, mesh=None, shardings=None) -> (cfg, params)` validates the whole folder
first (architecture, every shard present, every tensor's name, shape and dtype, the
tokenizer's vocabulary) from the safetensors headers alone, so a bad folder raises one
ValueError before anything is allocated. It then builds each parameter with
`jax.make_array_from_callback`: every device shard reads only its own slice of its own
layers from the memory-mapped files, so a 32B checkpoint never exists whole on the host.

`to_hf(cfg, params, path)` writes a folder `transformers` loads (sharded with an index above
`max_shard_bytes`). Layout: HF linear weights are [out, in]; ours are [in, heads, head_dim]
(q/k/v), [heads, head_dim, d_model] (o), [in, out] (mlp, lm_head), layers stacked on axis 0.
Both use the half-split RoPE layout, so no permutation is needed here (GGUF needs one).
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy, used by safetensors' reader
import numpy as np

from katjax.model.api import logical_axes, param_shapes
from katjax.model.config import ModelConfig
from katjax.model.tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ST_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def from_hf(path, mesh=None, shardings=None, rules=None) -> tuple[ModelConfig, dict]:
  """Local HF folder -> (ModelConfig, float32 params placed by `shardings` or `mesh`).

  shardings: pytree like the params of `jax.sharding.Sharding` (wins over mesh); mesh: a
  `jax.sharding.Mesh` whose logical-axis shardings come from `katjax.parallel`. Neither: the
  default device.
  """
  path = os.fspath(path)
  cfg = config_from_hf(_read_json(os.path.join(path, "config.json")))
  files = _tensor_index(path)
  plan = param_plan(cfg)
  _validate(cfg, plan, files, path)
  tok_file = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tok_file):
    import tokenizers
    n = tokenizers.Tokenizer.from_file(tok_file).get_vocab_size(with_added_tokens=True)
    check_vocab(n, cfg)
  targets = _target_shardings(cfg, mesh, shardings, rules)
  from safetensors import safe_open
  handles = {f: safe_open(os.path.join(path, f), framework="np") for f in set(files.values())}

  def read(name, index):
    return handles[files[name]].get_slice(name)[index]

  return cfg, build_params(cfg, plan, read, targets)


def to_hf(cfg: ModelConfig, params, path, dtype: str = "float32",
          max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> str:
  """Write params as a HF folder (config.json, safetensors, index when sharded); returns path.

  Arrays are gathered to the host one tensor at a time. `tokenizer` (a `Tokenizer`, or a
  `ByteTokenizer`, written as the equivalent byte-level tokenizer.json) is saved beside the
  weights.
  """
  path = os.fspath(path)
  if dtype not in _ST_DTYPE:
    raise ValueError(f"to_hf dtype must be one of {sorted(_ST_DTYPE)}, got {dtype!r}")
  hf_cfg = config_to_hf(cfg, dtype)
  if tokenizer is not None:
    check_vocab(tokenizer, cfg)
  shapes = jax.tree.map(lambda x: tuple(x.shape), param_shapes(cfg))
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if got != shapes:
    raise ValueError(f"params do not match cfg: expected shapes {shapes}, got {got}")
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, hf_shape, get in _export_tensors(cfg, params):
    arr = np.ascontiguousarray(get().reshape(hf_shape).astype(np.dtype(dtype)))
    if current and size + arr.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = arr
    size += arr.nbytes
  shards.append(current)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map = {}
  for fname, shard in zip(names, shards):
    save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
  if len(shards) > 1:
    total = sum(a.nbytes for s in shards for a in s.values())
    _write_json(os.path.join(path, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
  _write_json(os.path.join(path, "config.json"), hf_cfg)
  if tokenizer is not None:
    hf_tok = tokenizer.hf if hasattr(tokenizer, "hf") else byte_tokenizer_json(tokenizer)
    hf_tok.save(os.path.join(path, "tokenizer.json"))
  return path


def byte_tokenizer_json(tokenizer):
  """A `tokenizers.Tokenizer` that encodes and decodes exactly as the `ByteTokenizer`.

  Byte-level BPE with no merges: GPT-2's printable stand-in for byte b has id b, then the
  chat specials as added tokens in the ByteTokenizer's order (ids 256...). So an exported
  byte-level model runs under any engine that reads tokenizer.json.
  """
  import tokenizers
  from tokenizers import AddedToken, decoders, models, pre_tokenizers

  specials = sorted(tokenizer.special_ids, key=tokenizer.special_ids.get)
  if [tokenizer.special_ids[t] for t in specials] != list(range(256, 256 + len(specials))):
    raise ValueError("byte_tokenizer_json: the special ids must follow the 256 bytes")
  chars = _bytes_to_unicode()
  out = tokenizers.Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
  out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  out.decoder = decoders.ByteLevel()
  out.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  return out


def _bytes_to_unicode() -> dict:
  # GPT-2's table: printable bytes stand for themselves, the rest map to 256 + n.
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  table, n = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + n)
      n += 1
  return table


def config_from_hf(hf: dict) -> ModelConfig:
  """A transformers config.json dict -> ModelConfig (ValueError for what we cannot run)."""
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}: katjax "
                     f"loads {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
  if hf.get("mlp_bias"):
    raise ValueError("unsupported: mlp_bias=True")
  if family == "llama" and hf.get("attention_bias"):
    raise ValueError("unsupported: Llama attention_bias=True (o_proj bias)")
  if family == "qwen3" and hf.get("attention_bias"):
    raise ValueError("unsupported: Qwen3 attention_bias=True (o_proj bias)")
  if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
    raise ValueError("unsupported: use_sliding_window=True (katjax attends to the full row)")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = {}
  if rope_type == "linear":
    scaling = dict(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
  elif rope_type == "llama3":
    scaling = dict(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position=int(rope["original_max_position_embeddings"]))
  elif rope_type != "default":
    raise ValueError(f"unsupported rope type {rope_type!r} (default, linear, llama3)")
  n_heads = hf["num_attention_heads"]
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
      ffn_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta), rope_layout="half", qkv_bias=family == "qwen2",
      qk_norm=family == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      family=family, **scaling)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  """ModelConfig -> a transformers config.json dict (legacy rope keys, read by 4.x and 5.x)."""
  if cfg.rope_layout != "half":
    raise ValueError("to_hf needs rope_layout='half' (HF rotates half-split pairs)")
  family = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
  if cfg.family not in ("llama", family) or (cfg.qkv_bias and cfg.qk_norm):
    raise ValueError(f"no HF architecture for family={cfg.family!r} with qkv_bias="
                     f"{cfg.qkv_bias}, qk_norm={cfg.qk_norm}")
  arch = {v: k for k, v in ARCHITECTURES.items()}[family]
  out = {"architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
         "head_dim": cfg.dim_per_head, "intermediate_size": cfg.ffn_dim,
         "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
         "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
         "torch_dtype": dtype, "max_position_embeddings": 32768}
  if cfg.rope_scaling == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                           "low_freq_factor": cfg.rope_low_freq_factor,
                           "high_freq_factor": cfg.rope_high_freq_factor,
                           "original_max_position_embeddings": cfg.rope_original_max_position}
    out["max_position_embeddings"] = max(32768, 2 * cfg.rope_original_max_position)
  return out


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
  """ValueError if the tokenizer (or a vocab size) has ids the model has no embedding for."""
  n = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
  if n > cfg.vocab_size:
    raise ValueError(f"tokenizer vocab_size {n} exceeds the model's "
                     f"vocab_size {cfg.vocab_size}: its ids would index past the embedding")


def load_tokenizer(path, cfg: ModelConfig | None = None) -> Tokenizer:
  """tokenizer.json of a model folder, checked against cfg's vocabulary when given."""
  tok = Tokenizer.from_file(path)
  if cfg is not None:
    check_vocab(tok, cfg)
  return tok


# --- layout: one entry per parameter leaf ---------------------------------------------------


def param_plan(cfg: ModelConfig) -> dict:
  """{param path: (hf name template, per-layer?, hf shape, split shape, perm)}.

  The HF tensor reshaped to `split` and transposed by `perm` is our (per-layer) array.
  """
  d, h, kv, hd, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head,
                        cfg.ffn_dim, cfg.vocab_size)
  lay = "model.layers.{}."
  plan = {
      ("embed", "embedding"): ("model.embed_tokens.weight", False, (v, d), (v, d), (0, 1)),
      ("final_norm", "scale"): ("model.norm.weight", False, (d,), (d,), (0,)),
      ("layers", "attn_norm", "scale"): (lay + "input_layernorm.weight", True, (d,), (d,),
                                         (0,)),
      ("layers", "mlp_norm", "scale"): (lay + "post_attention_layernorm.weight", True, (d,),
                                        (d,), (0,)),
      ("layers", "attn", "o", "kernel"): (lay + "self_attn.o_proj.weight", True, (d, h * hd),
                                          (d, h, hd), (1, 2, 0)),
  }
  for name, heads in (("q", h), ("k", kv), ("v", kv)):
    plan[("layers", "attn", name, "kernel")] = (
        lay + f"self_attn.{name}_proj.weight", True, (heads * hd, d), (heads, hd, d), (2, 0, 1))
    if cfg.qkv_bias:
      plan[("layers", "attn", name, "bias")] = (
          lay + f"self_attn.{name}_proj.bias", True, (heads * hd,), (heads, hd), (0, 1))
  if cfg.qk_norm:
    for name in ("q_norm", "k_norm"):
      plan[("layers", "attn", name, "scale")] = (lay + f"self_attn.{name}.weight", True, (hd,),
                                                 (hd,), (0,))
  for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
    plan[("layers", "mlp", name, "kernel")] = (lay + f"mlp.{name}_proj.weight", True, shape,
                                               shape, (1, 0))
  if not cfg.tie_embeddings:
    plan[("lm_head", "kernel")] = ("lm_head.weight", False, (v, d), (v, d), (1, 0))
  return plan


def _hf_names(cfg, template, per_layer):
  return [template.format(i) for i in range(cfg.n_layers)] if per_layer else [template]


def build_params(cfg: ModelConfig, plan: dict, read, targets) -> dict:
  """Assemble params leaf by leaf; read(hf_name, index tuple) -> np array of that slice."""
  params = {}
  for key, (template, per_layer, hf_shape, split, perm) in plan.items():
    names = _hf_names(cfg, template, per_layer)
    ours = tuple(split[p] for p in perm)
    shape = ((cfg.n_layers,) if per_layer else ()) + ours
    sharding = _get(targets, key)

    def callback(index, names=names, hf_shape=hf_shape, split=split, perm=perm,
                 per_layer=per_layer):
      index = tuple(index) + (slice(None),) * (len(shape) - len(index))
      if not per_layer:
        return _read_slice(read, names[0], index, hf_shape, split, perm)
      layers = range(*index[0].indices(cfg.n_layers))
      return np.stack([_read_slice(read, names[i], index[1:], hf_shape, split, perm)
                       for i in layers])

    _set(params, key, jax.make_array_from_callback(shape, sharding, callback))
  return params


def _read_slice(read, name, our_index, hf_shape, split, perm):
  """Our slice of one HF tensor: read the covering HF rows/cols, reshape, slice, transpose."""
  split_index = [None] * len(split)
  for j, p in enumerate(perm):
    split_index[p] = our_index[j]
  split_index = [s if isinstance(s, slice) else slice(s, s + 1) for s in split_index]
  # Group the split axes by the HF axis they came from (split refines hf_shape in order).
  groups, k = [], 0
  for n in hf_shape:
    start, size = k, 1
    while size < n or (size == n and k == start):
      size *= split[k]
      k += 1
    groups.append(range(start, k))
  hf_index, local = [], []
  for g in groups:
    first = split_index[g[0]].indices(split[g[0]])
    inner = math.prod(split[a] for a in g[1:])
    hf_index.append(slice(first[0] * inner, first[1] * inner))
    local.append(slice(None))
    local.extend(split_index[a] for a in g[1:])
  raw = np.asarray(read(name, tuple(hf_index)), np.float32)
  lens = []
  for g in groups:
    first = split_index[g[0]].indices(split[g[0]])
    lens.append(first[1] - first[0])
    lens.extend(split[a] for a in g[1:])
  return raw.reshape(lens)[tuple(local)].transpose(perm)


def _export_tensors(cfg, params):
  """Yield (hf name, hf shape, thunk -> np float32 in split-then-transposed order)."""
  for key, (template, per_layer, hf_shape, split, perm) in param_plan(cfg).items():
    inverse = tuple(np.argsort(perm))
    leaf = _get(params, key)
    for i, name in enumerate(_hf_names(cfg, template, per_layer)):
      pick = (lambda leaf=leaf, i=i: leaf[i]) if per_layer else (lambda leaf=leaf: leaf)
      yield name, hf_shape, (lambda pick=pick: np.asarray(
          jax.device_get(pick()), np.float32).transpose(inverse))


# --- validation -----------------------------------------------------------------------------


def _tensor_index(path) -> dict:
  """{tensor name: file} from the sharded index or the single model.safetensors."""
  if not os.path.isdir(path):
    raise ValueError(f"model folder not found: {path}")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    files = _read_json(index).get("weight_map")
    if not isinstance(files, dict):
      raise ValueError(f"{index}: no weight_map")
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), framework="np") as f:
      files = {k: "model.safetensors" for k in f.keys()}
  else:
    raise ValueError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
  missing = sorted({f for f in files.values() if not os.path.isfile(os.path.join(path, f))})
  if missing:
    raise ValueError(f"{path}: missing shard file(s) {missing} listed in the index")
  return files


def _validate(cfg, plan, files, path):
  """Every tensor present, with the right shape and one floating dtype (headers only)."""
  from safetensors import safe_open
  dtypes = {}
  headers = {}
  for f in sorted(set(files.values())):
    with safe_open(os.path.join(path, f), framework="np") as h:
      headers.update({k: (h.get_slice(k).get_shape(), h.get_slice(k).get_dtype(), f)
                      for k in h.keys()})
  for key, (template, per_layer, hf_shape, _, _) in plan.items():
    for name in _hf_names(cfg, template, per_layer):
      if name not in files or name not in headers:
        where = files.get(name)
        raise ValueError(f"{path}: tensor {name!r} is missing" +
                         (f" from shard {where}" if where else ""))
      shape, dt, f = headers[name]
      if tuple(shape) != tuple(hf_shape):
        raise ValueError(f"{path}/{f}: tensor {name!r} has shape {tuple(shape)}, config.json "
                         f"implies {tuple(hf_shape)}")
      if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{path}/{f}: tensor {name!r} has dtype {dt}; expected a float "
                         f"dtype {sorted(_FLOAT_DTYPES)} (quantised checkpoints unsupported)")
      dtypes.setdefault(dt, name)
  if len(dtypes) > 1:
    raise ValueError(f"{path}: dtype mismatch between tensors: " +
                     ", ".join(f"{n!r} is {d}" for d, n in dtypes.items()))


def _target_shardings(cfg, mesh, shardings, rules):
  shapes = param_shapes(cfg)
  if shardings is not None:
    if jax.tree.structure(shardings) != jax.tree.structure(shapes):
      raise ValueError("shardings must be a pytree with the structure of the params")
    return shardings
  if mesh is not None:
    from katjax import parallel
    kw = {} if rules is None else {"rules": rules}
    return parallel.param_shardings(logical_axes(cfg), shapes, mesh, **kw)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, shapes)


def _get(tree, key):
  for k in key:
    tree = tree[k]
  return tree


def _set(tree, key, value):
  for k in key[:-1]:
    tree = tree.setdefault(k, {})
  tree[key[-1]] = value


def _read_json(path):
  if not os.path.isfile(path):
    raise ValueError(f"{path} not found")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from e


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
