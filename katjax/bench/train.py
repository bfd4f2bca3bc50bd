"""SFT step throughput on this machine: `python -m katjax.bench.train` prints one JSON line.

Keys: tiny_tokens_per_s, smollm2_tokens_per_s (the jitted SFT train_step on random params,
after compilation, median of a few steps), packing_efficiency (default SFT data, tiny config
seq_len), katjax_vs_tunix_sft (katjax / Tunix tokens/s of the same SFT step on a shared tiny
Qwen3 config, batch 8 x 512, with each side's tokens/s, the best-step ratio and the CPU-time
ratio beside it; null with a reason when `google-tunix`, the bench extra, is not installed).
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
                              family="qwen3", scan_unroll=4)
OPTIMIZER = {"warmup_steps": 1, "total_steps": 100}


def random_sft_batch(vocab_size, batch, seq_len, seed=0) -> dict:
  """Fully causal random rows; the loss covers every target but the last column's (which
  has no next token), the same targets Tunix's default SFT loss uses."""
  tokens = np.random.RandomState(seed).randint(0, vocab_size, (batch, seq_len)).astype(np.int32)
  weights = np.ones_like(tokens)
  weights[:, -1] = 0
  return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": weights,
          "segment_ids": np.ones_like(tokens),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape),
          "subtree_end": np.full_like(tokens, seq_len)}


def seconds(run_step) -> float:
  """Wall time of one call of `run_step()` (which waits for its results)."""
  t = time.perf_counter()
  run_step()
  return time.perf_counter() - t


def median_seconds(run_step, steps) -> float:
  """Median of `steps` timed calls, after one untimed call that compiles."""
  run_step()
  return float(np.median([seconds(run_step) for _ in range(steps)]))


def katjax_sft_step(cfg, batch, seq_len):
  """A zero-argument closure running katjax's jitted SFT train_step once (random params)."""
  opt = make_optimizer(OPTIMIZER)
  state = TrainState.create(km.init(cfg, jax.random.PRNGKey(0)), opt, jax.random.PRNGKey(1))
  step = jax.jit(functools.partial(train_step, loss_fn=functools.partial(lm_loss, cfg),
                                   optimizer=opt), donate_argnums=0)
  b = jax.tree.map(jnp.asarray, random_sft_batch(cfg.vocab_size, batch, seq_len))
  holder = [state]

  def run():
    holder[0], m = step(holder[0], b)
    jax.block_until_ready((holder[0], m))

  return run


def sft_tokens_per_s(cfg, batch, seq_len, steps=3) -> float:
  """Tokens/s of the jitted SFT train_step (random params, fully causal rows)."""
  return batch * seq_len / median_seconds(katjax_sft_step(cfg, batch, seq_len), steps)


def packing_efficiency(seq_len=512) -> float:
  with tempfile.TemporaryDirectory() as d:
    paths = write_default_data(d)
    return load_sft(paths["sft_train"], ByteTokenizer(), seq_len).stats.efficiency


def tunix_vs_katjax(batch=8, seq_len=512, steps=6):
  """(katjax / Tunix tokens/s or None, note, {tokens/s of each}) on SHARED_QWEN3.

  The same SFT step on both sides: same tokens and loss targets, AdamW with the same
  schedule and clipping, fp32, no remat, compilation excluded. The two are timed
  alternately, one step each per round, so load on the machine hits both.
  """
  try:
    from katjax.bench import tunix_sft
    tunix_step, trainer = tunix_sft.make_tunix_step(SHARED_QWEN3, OPTIMIZER)
  except ImportError as e:
    return None, f"google-tunix not usable ({e}); make .venv/.installed-bench", {}
  b = random_sft_batch(SHARED_QWEN3.vocab_size, batch, seq_len)
  tunix_input = tunix_sft.training_input(b["tokens"], np.ones_like(b["tokens"]))

  def run_tunix():
    loss, _, grad_norm = tunix_step(tunix_input)
    jax.block_until_ready((loss, grad_norm))
    tunix_sft.block_on_model(trainer)

  run_katjax = katjax_sft_step(SHARED_QWEN3, batch, seq_len)
  run_tunix()  # compile both before timing
  run_katjax()
  wall = {"katjax": [], "tunix": []}
  cpu = {"katjax": [], "tunix": []}
  for _ in range(steps):
    for name, run in (("katjax", run_katjax), ("tunix", run_tunix)):
      c0 = time.process_time()
      wall[name].append(seconds(run))
      cpu[name].append(time.process_time() - c0)
  tokens = batch * seq_len
  med = {k: float(np.median(v)) for k, v in wall.items()}
  figures = {
      "katjax_shared_qwen3_tokens_per_s": tokens / med["katjax"],
      "tunix_shared_qwen3_tokens_per_s": tokens / med["tunix"],
      # On a shared, loaded CPU single steps swing by 2x; two steadier views of the same
      # runs: the least-disturbed step of each side, and the CPU seconds each step used.
      "katjax_vs_tunix_sft_best_step": min(wall["tunix"]) / min(wall["katjax"]),
      "katjax_vs_tunix_sft_cpu_time": float(np.median(cpu["tunix"]) / np.median(cpu["katjax"])),
  }
  ratio = med["tunix"] / med["katjax"]
  import tunix
  note = (f"google-tunix {tunix.__version__} PeftTrainer train step (qwen3 model, default SFT "
          f"loss); median of {steps} alternating steps each, batch {batch} x {seq_len}, fp32")
  return ratio, note, figures


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--skip-smollm2", action="store_true")
  args = p.parse_args()
  out = {"device": jax.devices()[0].platform, "devices": jax.device_count()}
  out["tiny_tokens_per_s"] = sft_tokens_per_s(km.TINY.replace(vocab_size=272), 4, 512)
  out["smollm2_tokens_per_s"] = (None if args.skip_smollm2 else
                                 sft_tokens_per_s(SMOLLM2, 1, 512, steps=2))
  out["packing_efficiency"] = packing_efficiency()
  ratio, note, figures = tunix_vs_katjax()
  out["katjax_vs_tunix_sft"] = ratio
  out["tunix_note"] = note
  out.update(figures)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
