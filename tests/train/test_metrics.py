"""MetricsLogger: process 0 alone writes logs (several hosts share one workdir)."""

import json
import os

from katjax.train import metrics


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  log = metrics.MetricsLogger(str(tmp_path / "logs"), total_steps=2)
  log.write(1, {"loss": 1.0})
  log.advance(1)
  log.close()
  # no event file, no metrics.jsonl, not even the directory: a second writer would race
  assert not os.path.exists(tmp_path / "logs")


def test_process_zero_writes_each_step_once(tmp_path):
  log = metrics.MetricsLogger(str(tmp_path / "logs"), total_steps=2)
  log.write(1, {"loss": 1.5})
  log.write(2, {"loss": 0.5})
  log.close()
  with open(tmp_path / "logs" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 0.5)]
  assert len([x for x in os.listdir(tmp_path / "logs") if x.startswith("events.")]) == 1
