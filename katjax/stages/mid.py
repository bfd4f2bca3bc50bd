"""Stage 1, mid-training: continued LM training on agent transcripts and code documents."""

from __future__ import annotations

from katjax.data import load_mid
from katjax.stages.common import data_files, make_tokenizer, report
from katjax.train.loop import train_lm


def run(config, workdir: str) -> dict:
  """encode + eos -> concatenate-and-split packing -> train_lm; returns the summary."""
  tok = make_tokenizer(config)
  train_path, eval_path = data_files(config, workdir, "mid")
  seq_len, on_error = config.data.seq_len, config.data.on_error
  train = load_mid(train_path, tok, seq_len, on_error=on_error)
  evals = load_mid(eval_path, tok, seq_len, on_error=on_error)
  summary = train_lm(config, workdir, train, evals)
  report("mid", train, summary)
  return summary
