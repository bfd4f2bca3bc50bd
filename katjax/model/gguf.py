"""GGUF import (llama.cpp files): `from_gguf(path) -> (cfg, params, tokenizer)`.

Tensors are dequantised with the `gguf` package (F32/F16/BF16, Q4_0/Q4_1/Q8_0 and the
K-quants it implements) one tensor at a time and fed to the same per-shard builder as
`from_hf`. llama.cpp's converter permutes the rows of the Llama q/k projections so that
each rotary pair is adjacent (GGML's interleaved rope); we undo it, so the params use the
half-split layout of Hugging Face and `to_hf` can write them unchanged. Qwen2/Qwen3 files
use the NeoX (half-split) rope and are not permuted. The BPE tokenizer stored in the file
becomes a `katjax.model.Tokenizer`.
"""

from __future__ import annotations

import os

import numpy as np

from katjax.model import hf
from katjax.model.config import ModelConfig
from katjax.model.tokenizer import Tokenizer

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# llama.cpp pre-tokenizer names whose regex is GPT-2's with single digits split off.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def from_gguf(path, mesh=None, shardings=None) -> tuple[ModelConfig, dict, Tokenizer]:
  """GGUF file -> (ModelConfig, float32 params, Tokenizer); mesh/shardings as in from_hf."""
  from gguf import GGUFReader

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"GGUF file not found: {path}")
  reader = GGUFReader(path)
  meta = {k: _field_value(f) for k, f in reader.fields.items()
          if not k.startswith("tokenizer.ggml.") or k.endswith("_id") or k.endswith(".pre")
          or k.endswith(".model")}
  tensors = {t.name: t for t in reader.tensors}
  arch = meta.get("general.architecture")
  if arch not in _ARCHS:
    raise ValueError(f"unsupported GGUF architecture {arch!r}: katjax loads {sorted(_ARCHS)}")
  if "rope_freqs.weight" in tensors:
    raise ValueError("unsupported: GGUF rope_freqs tensor (Llama 3.1 rope scaling)")
  cfg = hf.config_from_hf(_hf_config(arch, meta, tensors))
  tokenizer = tokenizer_from_gguf(reader, meta)
  hf.check_vocab(tokenizer, cfg)
  names = {}
  for name in tensors:
    if name.startswith("blk."):
      _, layer, rest = name.split(".", 2)
      if rest in _LAYER_NAMES:
        names[f"model.layers.{layer}.{_LAYER_NAMES[rest]}"] = name
    elif name in _GLOBAL_NAMES:
      names[_GLOBAL_NAMES[name]] = name
  plan = hf.param_plan(cfg)
  for template, per_layer, hf_shape, _, _ in plan.values():
    for hf_name in ([template.format(i) for i in range(cfg.n_layers)] if per_layer
                    else [template]):
      if hf_name not in names:
        raise ValueError(f"{path}: no GGUF tensor for {hf_name}")
      got = tuple(int(n) for n in reversed(tensors[names[hf_name]].shape))
      if got != tuple(hf_shape):
        raise ValueError(f"{path}: tensor {names[hf_name]} has shape {got}, metadata implies "
                         f"{tuple(hf_shape)}")

  cache = {}

  def read(hf_name, index):
    # One dequantised tensor kept at a time: shards of one tensor are read back to back.
    if hf_name not in cache:
      cache.clear()
      cache[hf_name] = _dequantised(tensors[names[hf_name]], hf_name, cfg, arch)
    return cache[hf_name][index]

  targets = hf._target_shardings(cfg, mesh, shardings, None)
  params = hf.build_params(cfg, plan, read, targets)
  return cfg, params, tokenizer


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: w float[H*Dh, ...] (rotary pairs adjacent) ->
  HF order (first half of each head's rows, then the second half)."""
  rows = w.shape[0]
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def tokenizer_from_gguf(reader, meta: dict) -> Tokenizer:
  """The GGUF's BPE vocabulary, merges and special tokens as a `tokenizers` tokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (byte-level BPE 'gpt2' only)")
  tokens = _field_value(reader.fields["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in
            _field_value(reader.fields["tokenizer.ggml.merges"])]
  types = list(_field_value(reader.fields["tokenizer.ggml.token_type"]))
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                        ignore_merges=False))
  pre = meta.get("tokenizer.ggml.pre", "gpt2")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre == "qwen2":
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_QWEN2_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif pre in ("gpt2", "default"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
  tok.decoder = decoders.ByteLevel()
  # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
  special = [tokenizers.AddedToken(tokens[i], special=types[i] == 3, normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
  tok.add_tokens(special)
  eos = meta.get("tokenizer.ggml.eos_token_id")
  pad = meta.get("tokenizer.ggml.padding_token_id")
  return Tokenizer(tok, eos_token=None if eos is None else tokens[int(eos)],
                   pad_token=None if pad is None else tokens[int(pad)])


def _hf_config(arch, meta, tensors) -> dict:
  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata {arch}.{key} is missing")
    return value

  n_heads = int(get("attention.head_count"))
  d = int(get("embedding_length"))
  vocab = meta.get(f"{arch}.vocab_size") or int(tensors["token_embd.weight"].shape[1])
  return {"architectures": [_ARCHS[arch]], "vocab_size": int(vocab), "hidden_size": d,
          "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_heads,
          "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
          "head_dim": int(get("attention.key_length", d // n_heads)),
          "intermediate_size": int(get("feed_forward_length")),
          "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
          "rope_theta": float(get("rope.freq_base", 10000.0)),
          "tie_word_embeddings": "output.weight" not in tensors}


def _dequantised(tensor, hf_name, cfg, arch) -> np.ndarray:
  from gguf import GGMLQuantizationType, quants

  qtype = tensor.tensor_type
  if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
    w = np.asarray(tensor.data, np.float32)
  else:
    w = quants.dequantize(tensor.data, qtype).astype(np.float32)
  w = w.reshape(tuple(int(n) for n in reversed(tensor.shape)))
  if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
    heads = cfg.n_heads if "q_proj" in hf_name else cfg.n_kv_heads
    w = unpermute_qk(w, heads)
  return w


def _field_value(field):
  return field.contents()
