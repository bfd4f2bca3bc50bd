"""SmolLM2-135M (Llama architecture, tied embeddings): the real model of the interop issue.

Random init with the byte tokenizer by default (its ids are a subset of the vocabulary). To
fine-tune the real model: `python third_party/smollm2/convert.py DIR`, then
`--config.init_from=DIR --config.tokenizer=DIR/tokenizer.json`.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  steps = ml_collections.FieldReference(1000)
  c.model = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                 head_dim=64, ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                 tie_embeddings=True, dtype="bfloat16", remat=True, family="llama")
  c.init_from = ""  # a Hugging Face folder: step-0 params (a resumed run keeps its own)
  c.tokenizer = "byte"  # or a tokenizer.json path
  c.data = dict(train_file="", eval_file="", seq_len=2048, batch_size=8, seed=0,
                on_error="skip")
  c.optimizer = dict(learning_rate=1e-4, warmup_steps=50, total_steps=steps,
                     end_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                     clip_norm=1.0)
  c.train = dict(steps=steps, micro_batches=1, seed=0, log_every=10, eval_every=200,
                 eval_batches=4, checkpoint_every=200, keep=3, async_checkpoint=True,
                 peak_flops=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return c
