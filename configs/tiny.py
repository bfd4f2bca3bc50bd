"""Tiny CPU config: a 2-layer byte-level model on the embedded data; seconds per run."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  steps = ml_collections.FieldReference(30)
  c.model = dict(vocab_size=272, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 dtype="float32", remat=False, family="qwen3", qk_norm=True,
                 tie_embeddings=True, scan_unroll=2)
  c.tokenizer = "byte"  # "byte" (ByteTokenizer) or a path to a tokenizer.json
  c.init_from = ""  # a Hugging Face folder for the step-0 params ("" = random init)
  c.data = dict(train_file="", eval_file="",  # "" = embedded synthetic data
                seq_len=512, batch_size=4, seed=0, on_error="skip")
  c.optimizer = dict(learning_rate=3e-3, warmup_steps=5, total_steps=steps, end_lr_ratio=0.1,
                     weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  c.train = dict(steps=steps, micro_batches=1, seed=0, log_every=5, eval_every=15,
                 eval_batches=2, checkpoint_every=15, keep=2, async_checkpoint=True,
                 peak_flops=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return c
