"""Tiny RFT on CPU: configs/rl_tiny.py plus ground-truth-relative rewards.

`python -m katjax.launch --stage=rft --config=configs/rft_tiny.py`. rl.rft: reward =
(1 - outcome_weight) * LCS similarity to the teacher + outcome_weight * environment reward;
a monitor ends rollouts whose similarity to the teacher prefix stays below min_similarity
for `patience` turns (or that break the tool schema); the teacher joins each tree.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rl_tiny  # noqa: E402


def get_config():
  c = rl_tiny.get_config()
  c.rl.rft.update(metric="lcs", outcome_weight=0.5, monitor=True, patience=2,
                  schema_patience=1, min_similarity=0.2, teacher_branch=True)
  return c
