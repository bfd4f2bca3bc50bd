"""SmolLM2-135M (Llama architecture, tied embeddings): the real model of the interop issue.

Random init with the byte tokenizer by default (its ids are a subset of the vocabulary). To
fine-tune the real model: `python third_party/smollm2/convert.py DIR`, then
`--config.init_from=DIR --config.tokenizer=""` (the tokenizer.json beside the weights).

`--config=configs/smollm2_135m.py:pipeline` is the lookup pipeline of
configs/pipeline_tiny.py run on the real instruct model (README, "The pipeline"):

    python third_party/smollm2/convert.py /tmp/smollm2
    python -m katjax.launch --stage=all --config=configs/smollm2_135m.py:pipeline \
        --config.init_from=/tmp/smollm2 --workdir=DIR

eval(base) -> SFT -> eval -> RL -> eval from the instruct weights with the model's own
tokenizer (no BPE, no mid-training: pretraining already taught it to copy), float32 (the
CPU's fast path) and schedules sized for a 2-core CPU.
"""

from katjax.train.config import base_config


def get_config(variant: str = ""):
  if variant not in ("", "pipeline"):
    raise ValueError(f"configs/smollm2_135m.py: unknown variant {variant!r} (known: "
                     f"'' and 'pipeline')")
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
  if variant == "pipeline":
    _pipeline(c)
  return c


def _pipeline(c):
  c.tokenizer = ""  # the tokenizer.json beside init_from's weights
  c.model.update(dtype="float32", remat=False)
  # An SFT episode is ~150-300 SmolLM2 tokens (digits are single tokens; every key is one).
  c.data.update(seq_len=512, batch_size=4, on_error="raise")
  c.optimizer.update(warmup_steps=5, weight_decay=0.0)
  c.train.update(log_every=5, eval_every=0, checkpoint_every=1000, keep=1,
                 async_checkpoint=False)
  c.mesh.update(data=1)
  # Three parallel look-ups are ~80 tokens in the Hermes format: 96 new tokens per turn.
  c.rl.update(env="lookup", num_tasks=2000, tasks_per_step=4, group_size=4, temperature=1.0,
              max_turns=3, max_new_tokens=96, max_tokens=512, num_rows=2, row_tokens=2048,
              norm="token-mean", prune_selector="entropy")
  c.eval.update(num_tasks=64, seed=0, temperature=0.0, samples=1)
  c.pipeline.update(stages="base,sft,rl", sft_episodes=2000, sft_steps=30, sft_lr=1e-4,
                    rl_steps=5, rl_lr=2e-5)
