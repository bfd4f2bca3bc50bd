"""The one metrics logger: TensorBoard event files, a JSONL copy, and a console progress bar."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import tqdm
from tensorboardX import SummaryWriter


class MetricsLogger:
  """write(step, {name: scalar}, prefix) -> TensorBoard + metrics.jsonl; bar shows progress;
  record(step, split, {...}) -> metrics.jsonl alone (structured, non-scalar records)."""

  def __init__(self, logdir: str, total_steps: int, initial_step: int = 0, enabled=True):
    self.enabled = enabled and jax.process_index() == 0  # multi-host: process 0 reports
    self._tb = self._jsonl = self._bar = None
    if not self.enabled:  # the other processes open no event file, log or progress bar
      return
    os.makedirs(logdir, exist_ok=True)
    self._tb = SummaryWriter(logdir)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="train",
                          dynamic_ncols=True, mininterval=0.5)

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self._jsonl.flush()
    shown = {k: f"{scalars[k]:.4g}" for k in ("loss", "lr", "tokens_per_s") if k in scalars}
    if prefix == "train":
      self._bar.set_postfix(shown, refresh=False)
    else:
      self._bar.write(f"step {step} {prefix}: " + " ".join(f"{k}={v:.4f}" for k, v in
                                                            scalars.items()))

  def record(self, step: int, split: str, payload: dict) -> None:
    """A structured (JSON) record for metrics.jsonl only, e.g. which data a step consumed."""
    if self.enabled:
      self._jsonl.write(json.dumps({"step": step, "split": split, **payload}) + "\n")
      self._jsonl.flush()

  def advance(self, n: int = 1) -> None:
    if self.enabled:
      self._bar.update(n)

  def print(self, text: str) -> None:
    if self.enabled:
      self._bar.write(text)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()
