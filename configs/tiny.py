"""Tiny CPU config: a 2-layer byte-level model on the embedded data; seconds per run.

Every field and its default is declared once in katjax/train/config.py; this file sets only
what differs (and is the base of rl_tiny, rft_tiny and serve).
"""

from katjax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=272, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 dtype="float32", remat=False, family="qwen3", qk_norm=True,
                 tie_embeddings=True, scan_unroll=2)
  c.tokenizer = "byte"  # "byte", a tokenizer.json path, or "" = the one of init_from
  c.init_from = ""  # a previous stage's workdir or a Hugging Face folder ("" = random init)
  c.data.update(seq_len=512, batch_size=4)  # train_file / eval_file "": the embedded data
  c.optimizer.update(learning_rate=3e-3, warmup_steps=5, weight_decay=0.01)
  c.train.update(steps=30, micro_batches=1, log_every=5, eval_every=15, eval_batches=2,
                 checkpoint_every=15, keep=2)
  return c
