"""Tiny agentic RL on CPU: the byte-level tiny model on the arithmetic tool environment.

Also the base of configs/rft_tiny.py (RFT adds a config.rl.rft section).

`python -m katjax.launch --stage=rl --config=configs/rl_tiny.py`: each step runs
rl.tasks_per_step x rl.group_size agent episodes with the current weights, merges each
task's rollouts into a prefix tree, prunes the forest to rl.num_rows x rl.row_tokens and
takes one tree-loss step. The byte-level prompt (system text and tool schemas) alone is
~960 tokens, hence rl.max_tokens. A random tiny model rarely solves a task, so the reward stays near
0: this config exercises the machinery, not learning.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402


def get_config():
  c = ml_collections.ConfigDict()
  steps = ml_collections.FieldReference(4)
  c.model = tiny.get_config().model  # the tiny byte-level model of configs/tiny.py
  c.tokenizer = "byte"
  c.rl = dict(env="arithmetic", tasks_file="", num_tasks=64, task_seed=0, tasks_per_step=2,
              group_size=4, temperature=1.0, top_p=1.0, max_turns=2, max_new_tokens=48,
              max_tokens=1280, num_rows=2, row_tokens=2048, norm="token-mean",
              prune_selector="entropy", loss=dict(eps_low=0.2, eps_high=0.28))
  c.optimizer = dict(learning_rate=1e-3, warmup_steps=1, total_steps=steps, end_lr_ratio=0.1,
                     weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
  c.train = dict(steps=steps, seed=0, log_every=1, checkpoint_every=2, keep=2,
                 async_checkpoint=True,
                 peak_flops=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return c
