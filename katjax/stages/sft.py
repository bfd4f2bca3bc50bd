"""Stage 2, SFT: chat trajectories with tool calls, loss on assistant tokens only."""

from __future__ import annotations

from katjax.data import load_sft
from katjax.stages.common import data_files, make_tokenizer, report
from katjax.train.loop import train_lm


def run(config, workdir: str) -> dict:
  """encode_chat -> first-fit packing -> train_lm; returns the loop's summary."""
  tok = make_tokenizer(config)
  train_path, eval_path = data_files(config, workdir, "sft")
  seq_len, on_error = config.data.seq_len, config.data.on_error
  train = load_sft(train_path, tok, seq_len, on_error=on_error)
  evals = load_sft(eval_path, tok, seq_len, on_error=on_error)
  summary = train_lm(config, workdir, train, evals)
  report("sft", train, summary)
  return summary
