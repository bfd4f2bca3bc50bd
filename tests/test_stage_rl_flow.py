"""`--stage=rl` with `rl.mode=async` (SeamlessFlow): trains on threads or on Ray, checkpoints
the flow's state, and after a real kill -9 the rerun trains the groups that were waiting at
the checkpoint once and none of those trained before it again."""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from katjax.envs.toy import ArithmeticEnv
from katjax.stages import rl as rl_stage
from katjax.testing import compile_cache


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  with compile_cache.persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def _config(steps):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "rl_tiny", os.path.join(os.path.dirname(__file__), "..", "configs", "rl_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.update(steps=steps, checkpoint_every=1, async_checkpoint=False)
  c.rl.update(mode="async", eta=1, rollout_slots=4, tasks_per_step=1, group_size=2,
              max_turns=1, max_new_tokens=16, max_tokens=1024, num_rows=1, row_tokens=2048)
  c.mesh.update(data=1, fsdp=1, tensor=-1)
  return c


def test_async_mode_bad_config():
  c = _config(1)
  c.rl.eta = -1
  with pytest.raises(ValueError, match="config.rl.eta"):
    rl_stage.train_rl(c, "/nonexistent")


def test_async_mode_refuses_several_jax_processes(tmp_path, monkeypatch):
  from katjax.stages import rl_flow
  monkeypatch.setattr(rl_flow.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"rl.mode='async' trains in one JAX process, and this "
                                       r"run has 2: on several hosts use rl.mode='sync'"):
    rl_stage.train_rl(_config(1), str(tmp_path))


# --- a real kill -9 of `python -m katjax.launch --stage=rl --config.rl.mode=async` ----------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # margin: a kill even at the second checkpoint leaves steps for fresh groups
KILL_CMD = [sys.executable, "-m", "katjax.launch", "--stage=rl",
            f"--config={os.path.join(ROOT, 'configs', 'rl_tiny.py')}", "--config.rl.mode=async",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
            "--config.train.keep=10", "--config.rl.eta=2", "--config.rl.rollout_slots=4",
            "--config.rl.tasks_per_step=1", "--config.rl.group_size=2",
            "--config.rl.max_turns=1", "--config.rl.max_new_tokens=8",
            "--config.rl.max_tokens=1024", "--config.rl.num_rows=1",
            "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=-1"]


def _records(path, split="flow"):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.endswith("\n")]  # a torn last line: skip
  return [r for r in lines if r["split"] == split]


def _complete_checkpoints(workdir):
  d = os.path.join(workdir, "checkpoints")  # orbax renames "N.orbax-checkpoint-tmp-*" to "N"
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _crc(token_lists):
  """Independent of the code under test: crc32 over (int32 length, int32 ids) per list."""
  crc = 0
  for t in token_lists:
    a = np.asarray(t, np.int32)
    crc = zlib.crc32(np.int32(a.size).tobytes() + a.tobytes(), crc)
  return crc


def _saved_ready_groups(workdir, step):
  """(id, fingerprint, min, max trained version) of each finished, untrained group in the
  flow state of checkpoint `step`, computed from the saved token records."""
  path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
  with open(path) as f:
    saved = json.load(f)
  groups = []
  for gid in saved["manager"]["ready"]:
    branches = [b for s in saved["manager"]["groups"][str(gid)]
                for b in saved["manager"]["sessions"][s]["branches"]]
    versions = [v for b in branches for v, m in zip(b["version"], b["loss_mask"]) if m]
    groups.append((gid, _crc([b["tokens"] for b in branches]), min(versions), max(versions)))
  return saved["manager"], groups


@pytest.mark.slow
def test_kill_9_and_resume_loses_no_finished_group_and_trains_none_twice(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             **compile_cache.env(tmp_path / "jax_cache"))
  cmd = KILL_CMD + [f"--workdir={workdir}"]
  metrics = os.path.join(workdir, "logs", "metrics.jsonl")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  try:
    # Kill once a checkpoint exists and a step after it has been trained.
    while time.time() < deadline and proc.poll() is None:
      done = [r["step"] for r in _records(metrics)]
      ckpts = _complete_checkpoints(workdir)
      if ckpts and done and max(done) > ckpts[-1]:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  first = _records(metrics)
  at = _complete_checkpoints(workdir)[-1]  # what the rerun resumes from
  assert 1 <= at < STEPS and max(r["step"] for r in first) > at
  saved, waiting = _saved_ready_groups(workdir, at)
  assert waiting, "no finished group was waiting at the checkpoint: nothing to test"

  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"resumed from step {at}" in res.stdout + res.stderr
  second = _records(metrics)[len(first):]

  key = lambda g: (g["id"], g["fingerprint"], *g["versions"])  # noqa: E731
  before = [key(g) for r in first if r["step"] <= at for g in r["groups"]]
  after = [key(g) for r in second for g in r["groups"]]
  assert sorted(r["step"] for r in first if r["step"] <= at) == list(range(1, at + 1))
  assert [r["step"] for r in second] == list(range(at + 1, STEPS + 1))
  assert len(after) == len(set(after)) == STEPS - at  # one group per step, none twice
  # Nothing lost: every group waiting at the checkpoint is trained after the resume, with
  # the very tokens and versions it was saved with.
  assert set(waiting) <= set(after)
  # Nothing repeated: no group trained up to the checkpoint is trained again (by id or
  # content).
  assert not {g[0] for g in before} & {g[0] for g in after}
  assert not {g[1] for g in before} & {g[1] for g in after}
  # The counters continue: the policy version of each step, the group ids, and the version
  # of every token generated after the resume (the engine starts at the checkpoint's).
  assert saved["version"] == at
  assert [r["version"] for r in second] == [r["step"] - 1 for r in second]
  fresh = [g for g in after if g not in waiting]  # generated after the resume
  assert fresh and all(g[0] >= saved["next_group"] for g in fresh)
  for r in second:
    for g in r["groups"]:
      lo, hi = g["versions"]
      assert hi <= r["step"] - 1  # no token from a version newer than the step's weights
      if g["id"] >= saved["next_group"]:
        assert lo >= at, (r, at)
  assert _complete_checkpoints(workdir)[-1] == STEPS


@pytest.mark.slow
def test_ray_scheduler_trains_the_same_steps_and_trajectories_as_threads(tmp_path,
                                                                        monkeypatch):
  pytest.importorskip("ray")
  # Random rewards in this process (the thread run's episodes), so its advantages and
  # losses are not all zero; Ray workers grade with the real environment.
  draws = iter(np.random.default_rng(0).random(1000))
  monkeypatch.setattr(ArithmeticEnv, "evaluate", lambda self: (float(next(draws)), {}))
  runs = {}
  for scheduler in ("thread", "ray"):  # "ray": a local instance, started and shut down
    c = _config(2)
    c.rl.scheduler = scheduler
    runs[scheduler] = rl_stage.train_rl(c, str(tmp_path / scheduler))
  assert sorted(runs["thread"]["loss"]) == [1, 2]
  assert all(np.isfinite(v) for v in runs["thread"]["loss"].values())
  logged = [json.loads(line) for line in open(tmp_path / "thread" / "logs" / "metrics.jsonl")]
  assert [m["step"] for m in logged if m["split"] == "train"] == [1, 2]
  thread, ray = runs["thread"]["flow"], runs["ray"]["flow"]
  assert thread["mode"] == "async" and thread["mean_staleness"] >= 0
  assert ray["scheduler"] == "ray" and thread["scheduler"] == "thread"
  # 2 steps x 1 group x 2 episodes of one turn (one branch each).
  assert ray["steps"] == thread["steps"] == 2
  assert ray["trajectories"] == thread["trajectories"] == 2 * 1 * 2
  for o in (thread, ray):
    assert o["tasks"]["trainer/train"] == 2
    assert o["tasks"]["agents/rollout"] >= 4 and o["failed_episodes"] == 0
  # On Ray every engine call came through the recording proxy to an admitted session.
  assert ray["manager"]["calls"] >= 4 and ray["manager"]["unknown_sessions"] == 0


def test_ray_scheduler_needs_async_mode():
  c = _config(1)
  c.rl.update(mode="sync", scheduler="ray")
  with pytest.raises(ValueError, match="config.rl.scheduler"):
    rl_stage.train_rl(c, "/nonexistent")
