"""Several CPU processes over localhost (jax.distributed, gloo collectives) train like one.

The same tiny mid-training run on a data=2 x fsdp=2 mesh of 4 devices, laid out as 1 process
x 4 devices, 2 x 2 and 4 x 1: every process reads its own rows of each global batch, so the
losses and parameters must equal the single-process run's. A checkpoint written by 2
processes resumes in 1 and one written by 1 resumes in 4, and both continue exactly as the
uninterrupted single-process run. Bad starts fail with errors naming the problem.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from katjax.data import write_default_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "parallel", "multihost_worker.py")


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def launch(n: int, specs, devices: int, timeout: float = 900.0, script=WORKER):
  """Start n processes (spec i for process i) on `devices` CPU devices each; -> outputs."""
  port = _port()
  procs = []
  for i in range(n):
    env = _env(devices)
    if n > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
                 JAX_PROCESS_ID=str(i), KATJAX_INIT_TIMEOUT="60")
    procs.append(subprocess.Popen([sys.executable, script, json.dumps(specs[i])], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [(p.returncode, o) for p, o in zip(procs, outs)]


def _ok(results):
  for rc, out in results:
    assert rc == 0, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """1, 2 and 4 processes; checkpoints crossed between process counts."""
  tmp = tmp_path_factory.mktemp("multihost")
  data = write_default_data(str(tmp / "data"), n_train=48, n_eval=4)
  config = {"data.train_file": data["mid_train"], "data.eval_file": data["mid_eval"],
            "data.seq_len": 64, "data.batch_size": 4, "mesh.data": 2, "mesh.fsdp": 2,
            "mesh.tensor": 1, "train.eval_every": 0, "train.log_every": 1,
            "train.checkpoint_every": 2, "train.async_checkpoint": False,
            "optimizer.warmup_steps": 1, "optimizer.total_steps": 20,
            "optimizer.learning_rate": 1e-2}
  out = str(tmp / "out")
  os.makedirs(out)
  d = lambda name: str(tmp / name)  # noqa: E731

  def spec(jobs):
    return {"config": config, "jobs": jobs, "out": out}

  # 2 processes from scratch; 1 process from scratch, resuming itself and the 2-process
  # checkpoint; 4 processes resuming the 1-process checkpoint (3 launches: each costs imports
  # and a compile per process).
  _ok(launch(2, [spec([["two", d("two"), 2, None]])] * 2, devices=2))
  _ok(launch(1, [spec([["one", d("one"), 2, None],
                       ["one_continued", d("one_continued"), 3, d("one")],
                       ["two_to_one", d("two_to_one"), 3, d("two")]])], devices=4))
  shutil.copytree(d("one"), d("one_to_four"))
  _ok(launch(4, [spec([["one_to_four", d("one_to_four"), 3, None]])] * 4, devices=1))
  return {name: dict(np.load(os.path.join(out, f"{name}.npz"))) for name in
          ("one", "two", "two_to_one", "one_to_four", "one_continued")}


def _assert_same(got, want):
  assert got.keys() == want.keys()
  np.testing.assert_array_equal(got["loss_steps"], want["loss_steps"])
  np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
  for k in want:
    if k.startswith("["):  # a parameter path
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
  assert int(runs["two"]["processes"]) == 2 and int(runs["one"]["processes"]) == 1
  assert int(runs["two"]["devices"]) == int(runs["one"]["devices"]) == 4
  np.testing.assert_array_equal(runs["one"]["loss_steps"], [1, 2])
  _assert_same(runs["two"], runs["one"])


@pytest.mark.slow
@pytest.mark.parametrize("name,processes", [("two_to_one", 1), ("one_to_four", 4)])
def test_checkpoint_restores_on_another_process_count(runs, name, processes):
  """2 -> 1 and 1 -> 4 processes: step 3 after the restore equals the uninterrupted run."""
  assert int(runs[name]["processes"]) == processes
  want = runs["one_continued"]
  np.testing.assert_array_equal(want["loss_steps"], [3])  # resumed at 2, ran step 3
  # the step moved the params: a restore that silently re-initialised would not match
  assert not np.allclose(want["losses"], runs["one"]["losses"][-1:], rtol=1e-3)
  _assert_same(runs[name], want)


def test_unreachable_coordinator_is_a_timeout_naming_the_address(tmp_path):
  port = _port()  # nothing listens there
  env = _env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
             JAX_PROCESS_ID=1, KATJAX_INIT_TIMEOUT=2)
  spec = {"config": {}, "jobs": [], "out": str(tmp_path)}
  p = subprocess.run([sys.executable, WORKER, json.dumps(spec)], env=env, timeout=120,
                     capture_output=True, text=True)
  assert p.returncode != 0
  assert f"could not reach the JAX coordinator at localhost:{port} within 2 s" in p.stderr


def test_processes_with_different_configs_fail_at_start_naming_the_field(tmp_path):
  specs = [{"config": {"train.seed": seed}, "jobs": [], "out": str(tmp_path)}
           for seed in (0, 7)]
  results = launch(2, specs, devices=1, timeout=120)
  for rc, out in results:  # both processes stop, not just the odd one
    assert rc != 0
    assert "train.seed = 7 on process 1, 0 on process 0" in out, out[-2000:]
  same = launch(2, [specs[0]] * 2, devices=1, timeout=120)
  assert all(rc == 0 and "configs agree" in out for rc, out in same)
