"""Qwen3-32B (the KAT-Dev-32B base) for TPU pods / GPU clusters; written, not run here.

64 layers, d 5120, 64 query / 8 KV heads of 128, ffn 25600, q/k RMSNorm, untied embeddings.
FSDP over 32 chips x tensor 8 (a v5p-512-class slice); bf16 compute, remat, blockwise
attention for 32k-token packed rows; micro-batches keep activations in HBM.
"""

from katjax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=151936, d_model=5120, n_layers=64, n_heads=64, n_kv_heads=8,
                 head_dim=128, ffn_dim=25600, norm_eps=1e-6, rope_theta=1000000.0,
                 qk_norm=True, tie_embeddings=False, dtype="bfloat16", remat=True,
                 attention_impl="blockwise", attention_block=1024, family="qwen3")
  c.tokenizer = "tokenizer.json"  # Qwen3's tokenizer.json (path on the training hosts)
  c.init_from = ""  # the Qwen3-32B Hugging Face folder on the training hosts ("" = random)
  c.data.update(seq_len=32768, batch_size=256)
  c.optimizer.update(learning_rate=1e-5, warmup_steps=100, weight_decay=0.1)
  c.train.update(steps=2000, micro_batches=4, log_every=10, eval_every=250, eval_batches=8,
                 checkpoint_every=250, keep=3)
  c.mesh.update(data=1, fsdp=32, tensor=8)
  return c
