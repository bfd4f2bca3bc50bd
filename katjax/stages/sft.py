"""Stage 2, SFT: chat trajectories with tool calls, loss on assistant tokens only."""

from __future__ import annotations

from katjax.data import load_sft
from katjax.stages.common import run_lm_stage


def run(config, workdir: str) -> dict:
  """encode_chat -> first-fit packing -> train_lm; returns the loop's summary."""
  return run_lm_stage(config, workdir, "sft", load_sft)
