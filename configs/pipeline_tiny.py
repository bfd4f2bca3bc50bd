"""The embedded default pipeline (`make demo`): base -> mid -> SFT -> RFT -> RL on lookup tasks.

`python -m katjax.launch --stage=all --config=configs/pipeline_tiny.py --workdir=DIR` trains
a compact BPE tokenizer on the mid corpus, then runs every stage from the previous one's
params and evaluates each on the held-out split (katjax.stages.all, docs/pipeline.md).
Sizes are chosen for minutes on a 2-core CPU: a 2-layer model, short schedules, 3 turns
per episode (level-4 tasks then need parallel tool calls).
"""

from katjax.train.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=640, d_model=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                 dtype="float32", remat=False, family="qwen3", qk_norm=True,
                 tie_embeddings=True, scan_unroll=2)
  c.tokenizer = ""  # --stage=all sets it: the BPE it trains into WORKDIR/tokenizer.json
  c.data.update(seq_len=384, batch_size=8, on_error="raise")  # an SFT episode: ~100-250
  c.optimizer.update(learning_rate=3e-3, warmup_steps=10, weight_decay=0.01)
  c.train.update(steps=100, log_every=10, eval_every=0, checkpoint_every=25, keep=1,
                 async_checkpoint=False)
  c.mesh.update(data=1)
  c.rl.update(env="lookup", num_tasks=2000, tasks_per_step=8, group_size=8, temperature=1.0,
              max_turns=3, max_new_tokens=80, max_tokens=512, num_rows=4, row_tokens=2048,
              norm="token-mean", prune_selector="entropy",
              # --config.rl.mode=async (stages/rl_flow.py): a whole step's episodes at once
              # on the engine, as the synchronous loop batches them, one version ahead.
              rollout_slots=64, eta=1)
  c.rl.rft.update(metric="lcs", outcome_weight=0.5, monitor=False, teacher_branch=True)
  c.eval.update(num_tasks=200, seed=0, temperature=0.0, samples=1)
  # Mid-training needs ~400 steps at lr 1e-2 to learn the copy drills (200 steps, or
  # lr 3e-2, stay at chance: docs/pipeline.md); SFT then learns the protocol in 200. RFT
  # needs 20 steps to drop the demonstrator's re-check and still copy the value (10 drop
  # it and break the copy: below SFT); RL then polishes the chains in 10, at lr 1e-3: at 2e-3
  # the asynchronous mode (eta 1) fell below its start in two seeds of three, and 1e-3 is
  # as good for the synchronous one (docs/benchmarks.md, flow_learning --seeds).
  c.pipeline.update(vocab_size=640, mid_docs=6000, sft_episodes=2000, mid_steps=400,
                    mid_lr=1e-2, sft_steps=200, sft_lr=3e-3, rft_steps=20, rft_lr=2e-3,
                    rl_steps=10, rl_lr=1e-3)
  return c
