"""Launcher: resume after SIGKILL is bit-for-bit; config typos fail naming the field."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from katjax.testing import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.data.seq_len=128", "--config.data.batch_size=4", "--config.train.steps=8",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.checkpoint_every=1", "--config.train.keep=3",
         "--config.optimizer.warmup_steps=2"]


def _cmd(workdir, *extra, stage="sft"):
  return [sys.executable, "-m", "katjax.launch", f"--stage={stage}", f"--workdir={workdir}",
          *SMALL, *extra]


def _env(cache=None):
  """cache: a compilation cache folder the runs of one test share (the resumed run loads
  the full run's executables instead of recompiling them)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  if cache is not None:
    env.update(compile_cache.env(cache))
  return env


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "logs", "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == "train":
        out[rec["step"]] = rec["loss"]  # a resumed run overwrites re-run steps
  return out


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  env = _env(cache=tmp_path / "jax_cache")
  subprocess.run(_cmd(full), cwd=ROOT, env=env, check=True, capture_output=True)
  proc = subprocess.Popen(_cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "logs", "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and max(_losses(killed) or [0]) >= 4:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(killed))
  assert 4 <= killed_at < 8
  res = subprocess.run(_cmd(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                       text=True)
  out = res.stdout + res.stderr
  assert "resumed from step" in out, out[-2000:]
  resumed_from = int(out.split("resumed from step ")[1].split()[0])
  assert 1 <= resumed_from <= killed_at
  a, b = _losses(full), _losses(killed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in range(1, 9):
    assert a[step] == b[step], (step, a[step], b[step])  # exact, not approximate


def test_config_typo_is_an_error_naming_the_field(tmp_path):
  res = subprocess.run(_cmd(str(tmp_path), "--config.train.stepz=3"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
  assert res.returncode != 0
  assert "stepz" in res.stderr


def test_mid_stage_runs_and_loss_falls(tmp_path):
  # In-process run of the mid-training stage on the embedded data.
  from ml_collections import config_flags  # noqa: F401  (config file loader)
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.seq_len, c.data.batch_size = 128, 8
  c.train.steps, c.train.log_every, c.train.eval_every = 12, 1, 12
  c.train.checkpoint_every, c.optimizer.warmup_steps = 12, 2
  from katjax.stages import mid
  summary = mid.run(c, str(tmp_path))
  losses = summary["losses"]
  assert losses[12] < losses[1] - 0.5
  assert summary["skipped"] == 0 and 12 in summary["eval_loss"]
  assert os.path.isdir(os.path.join(str(tmp_path), "checkpoints", "12"))
  assert any(f.startswith("events.out.tfevents")
             for f in os.listdir(os.path.join(str(tmp_path), "logs")))
