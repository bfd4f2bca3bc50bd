"""SmolLM2-135M (Llama architecture, tied embeddings): the real model of the interop issue.

Random init with the byte tokenizer by default (its ids are a subset of the vocabulary). To
fine-tune the real model: `python third_party/smollm2/convert.py DIR`, then
`--config.init_from=DIR --config.tokenizer=""` (the tokenizer.json beside the weights).
"""

from katjax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                 head_dim=64, ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                 tie_embeddings=True, dtype="bfloat16", remat=True, family="llama")
  c.init_from = ""  # a HF folder or a stage workdir: step-0 params (a resumed run keeps its own)
  c.tokenizer = "byte"  # or a tokenizer.json path, or "" = the one of init_from
  c.data.update(seq_len=2048, batch_size=8)
  c.optimizer.update(learning_rate=1e-4, warmup_steps=50, weight_decay=0.1)
  c.train.update(steps=1000, micro_batches=1, log_every=10, eval_every=200, eval_batches=4,
                 checkpoint_every=200, keep=3)
  return c
