"""Tunix's own SFT train step on a katjax ModelConfig, for `katjax.bench.train`'s comparison.

The step is the one `tunix.sft.peft_trainer.PeftTrainer.train` runs: its
`jit_train_and_eval_step(cache_nnx_graph=True)` (nnx.jit of `_train_step`, optimizer
donated), Tunix's default SFT loss (mean NLL over `input_mask`) and the input function of
Tunix's own PEFT CLI (positions and a causal [B, T, T] mask built inside the step). Only the
trainer's loop around it (checkpoints, metrics, progress bar) is left out, as katjax's bench
leaves out its own loop. Tunix is a bench-only extra: import this module only when needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from katjax import model as km
from katjax.train.state import make_schedule, optimizer_config


def tunix_qwen3_config(cfg: km.ModelConfig):
  """tunix.models.qwen3.ModelConfig with the same shapes, dtype and remat as `cfg`."""
  from tunix.models.qwen3 import model as qwen3
  if not cfg.qk_norm or cfg.qkv_bias:
    raise ValueError("the Tunix comparison needs a Qwen3-shaped config (qk_norm, no qkv bias)")
  remat = qwen3.RematConfig.DECODER if cfg.remat else qwen3.RematConfig.NONE
  return qwen3.ModelConfig(
      num_layers=cfg.n_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.d_model,
      hidden_dim=cfg.ffn_dim, num_heads=cfg.n_heads, head_dim=cfg.dim_per_head,
      num_kv_heads=cfg.n_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
      use_tied_embedding=cfg.tie_embeddings, remat_config=remat,
      dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)


def adamw_like_katjax(opt_cfg) -> optax.GradientTransformation:
  """katjax's optimizer (clip + AdamW, warmup + cosine) for Tunix's parameter tree.

  katjax's decay mask selects leaves by katjax's names; here matrices (ndim >= 2) decay,
  which is the same set of tensors under Tunix's names.
  """
  c = optimizer_config(opt_cfg)
  adamw = optax.adamw(make_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps,
                      weight_decay=c.weight_decay,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  parts = [optax.clip_by_global_norm(c.clip_norm)] if c.clip_norm > 0 else []
  return optax.chain(*parts, adamw)


def make_tunix_step(cfg: km.ModelConfig, opt_cfg, seed: int = 0):
  """(step, trainer): step(TrainingInput) -> (loss, aux, grad_norm), updating in place."""
  from flax import nnx
  from tunix.models.qwen3 import model as qwen3
  from tunix.sft import peft_trainer
  from tunix.sft import utils as sft_utils

  model = qwen3.Qwen3(tunix_qwen3_config(cfg), rngs=nnx.Rngs(seed))
  trainer = peft_trainer.PeftTrainer(
      model, adamw_like_katjax(opt_cfg),
      peft_trainer.TrainingConfig(eval_every_n_steps=1 << 30, max_steps=1 << 30))

  def gen_model_input_fn(x):
    # As tunix/cli/peft_main.py: every token is real here, so the pad mask is the input mask.
    valid = x.input_mask.astype(jnp.bool_)
    return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(valid),
            "attention_mask": sft_utils.make_causal_attn_mask(valid)}

  trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
  step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
  return step, trainer


def training_input(tokens, input_mask):
  from tunix.sft import peft_trainer
  return peft_trainer.TrainingInput(input_tokens=jnp.asarray(tokens),
                                    input_mask=jnp.asarray(input_mask))


def block_on_model(trainer) -> None:
  """Wait for the in-place parameter update, not only for the returned loss."""
  from flax import nnx
  jax.block_until_ready(nnx.state(trainer.model, nnx.Param))
