"""SFT step throughput on this machine: `python -m katjax.bench.train` prints one JSON line.

Keys: tiny_tokens_per_s, smollm2_tokens_per_s (the jitted SFT train_step on random params,
after compilation, median of a few steps), packing_efficiency (default SFT data, tiny config
seq_len), katjax_vs_tunix_sft (katjax / Tunix tokens/s on a shared tiny Qwen3 config, batch
8 x 512; null with a reason when `google-tunix`, the bench extra, is not installed).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from katjax import model as km
from katjax.data import load_sft, write_default_data
from katjax.model.tokenizer import ByteTokenizer
from katjax.train import TrainState, make_optimizer, train_step
from katjax.train.losses import lm_loss

SMOLLM2 = km.ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True, dtype="bfloat16", remat=True)
SHARED_QWEN3 = km.ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4,
                              n_kv_heads=4, head_dim=64, ffn_dim=1024, qk_norm=True,
                              family="qwen3")


def sft_tokens_per_s(cfg, batch, seq_len, steps=3) -> float:
  """Tokens/s of the jitted SFT train_step (random params, fully causal rows)."""
  opt = make_optimizer({"warmup_steps": 1, "total_steps": 100})
  state = TrainState.create(km.init(cfg, jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
  step = jax.jit(functools.partial(train_step, loss_fn=functools.partial(lm_loss, cfg),
                                   optimizer=opt), donate_argnums=0)
  rs = np.random.RandomState(0)
  tokens = rs.randint(0, cfg.vocab_size, (batch, seq_len)).astype(np.int32)
  b = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
       "weights": np.ones_like(tokens), "segment_ids": np.ones_like(tokens),
       "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape),
       "subtree_end": np.full_like(tokens, seq_len)}
  b = jax.tree.map(jnp.asarray, b)
  state, m = step(state, b)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return batch * seq_len / float(np.median(times))


def packing_efficiency(seq_len=512) -> float:
  with tempfile.TemporaryDirectory() as d:
    paths = write_default_data(d)
    return load_sft(paths["sft_train"], ByteTokenizer(), seq_len).stats.efficiency


def tunix_vs_katjax(batch=8, seq_len=512):
  """(ratio or None, note)."""
  try:
    import tunix  # noqa: F401
  except ImportError:
    return None, "google-tunix not installed (pip install -e '.[bench]')"
  return None, "tunix installed but the comparison harness is not written yet"


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--skip-smollm2", action="store_true")
  args = p.parse_args()
  out = {"device": jax.devices()[0].platform, "devices": jax.device_count()}
  out["tiny_tokens_per_s"] = sft_tokens_per_s(km.TINY.replace(vocab_size=272), 4, 512)
  out["smollm2_tokens_per_s"] = (None if args.skip_smollm2 else
                                 sft_tokens_per_s(SMOLLM2, 1, 512, steps=2))
  out["packing_efficiency"] = packing_efficiency()
  ratio, note = tunix_vs_katjax()
  out["katjax_vs_tunix_sft"] = ratio
  out["tunix_note"] = note
  print(json.dumps(out))


if __name__ == "__main__":
  main()
