"""Stage 1, mid-training: continued LM training on agent transcripts and code documents."""

from __future__ import annotations

from katjax.data import load_mid
from katjax.stages.common import run_lm_stage


def run(config, workdir: str) -> dict:
  """encode + eos -> concatenate-and-split packing -> train_lm; returns the summary."""
  return run_lm_stage(config, workdir, "mid", load_mid)
