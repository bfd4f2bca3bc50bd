"""The embedded default pipeline (`make demo`): base -> mid -> SFT -> RFT -> RL on lookup tasks.

`python -m katjax.launch --stage=all --config=configs/pipeline_tiny.py --workdir=DIR` trains
a compact BPE tokenizer on the mid corpus, then runs every stage from the previous one's
params and evaluates each on the held-out split (katjax.stages.all). Sizes are chosen for
minutes on a 2-core CPU: a 2-layer model, short schedules, 3 turns per episode.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = dict(vocab_size=640, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                 dtype="float32", remat=False, family="qwen3", qk_norm=True,
                 tie_embeddings=True, scan_unroll=2)
  c.tokenizer = ""  # set by the pipeline: the BPE it trains into WORKDIR/tokenizer.json
  c.init_from = ""
  c.data = dict(train_file="", eval_file="", seq_len=768, batch_size=8, seed=0,
                on_error="raise")
  c.optimizer = dict(learning_rate=3e-3, warmup_steps=10, total_steps=100, end_lr_ratio=0.1,
                     weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  c.train = dict(steps=100, micro_batches=1, seed=0, log_every=10, eval_every=0,
                 eval_batches=1, checkpoint_every=25, keep=1, async_checkpoint=False)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  # Agentic stages and evaluation: lookup tasks, 3 turns (level 4 needs parallel calls).
  c.rl = dict(env="lookup", tasks_file="", num_tasks=2000, task_seed=0, tasks_per_step=8,
              group_size=8, temperature=1.0, top_p=1.0, max_turns=3, max_new_tokens=80,
              max_tokens=512, num_rows=4, row_tokens=2048, norm="token-mean",
              prune_selector="entropy", loss=dict(eps_low=0.2, eps_high=0.28))
  c.rl.rft = dict(metric="lcs", outcome_weight=0.5, monitor=False, patience=2,
                  schema_patience=1, min_similarity=0.2, teacher_branch=True)
  c.eval = dict(num_tasks=200, seed=0, temperature=0.0, samples=1, tasks_file="")
  # Per-stage schedules of --stage=all (steps, peak learning rate) and data sizes.
  c.pipeline = dict(vocab_size=640, mid_docs=3000, sft_episodes=2000,
                    mid_steps=40, mid_lr=3e-3, sft_steps=120, sft_lr=2e-3,
                    rft_steps=10, rft_lr=3e-4, rl_steps=20, rl_lr=3e-4)
  return c
