"""Tiny agentic RL on CPU: the byte-level tiny model on the arithmetic tool environment.

Also the base of configs/rft_tiny.py.

`python -m katjax.launch --stage=rl --config=configs/rl_tiny.py`: each step runs
rl.tasks_per_step x rl.group_size agent episodes with the current weights, merges each
task's rollouts into a prefix tree, prunes the forest to rl.num_rows x rl.row_tokens and
takes one tree-loss step. The byte-level prompt (system text and tool schemas) alone is
~960 tokens, hence rl.max_tokens. A random tiny model rarely solves a task, so the reward
stays near 0: this config exercises the machinery, not learning. Start from a previous
stage with `--config.init_from=SFT_WORKDIR --config.tokenizer=""`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402


def get_config():
  c = tiny.get_config()  # the tiny byte-level model; rl.* defaults are the tiny run's
  c.rl.update(env="arithmetic", num_tasks=64, tasks_per_step=2, group_size=4, max_turns=2,
              max_new_tokens=48, max_tokens=1280, num_rows=2, row_tokens=2048,
              norm="token-mean", prune_selector="entropy")
  c.rl.loss.update(eps_low=0.2, eps_high=0.28)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=1, weight_decay=0.0)
  c.train.update(steps=4, log_every=1, checkpoint_every=2, keep=2)
  return c
