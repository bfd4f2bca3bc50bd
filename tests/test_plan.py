"""katjax.plan on a small config: the AOT plan's per-device bytes equal what a real sharded
train state holds, temporaries grow with the row, the fit table and the too-long-row error
name the largest row that fits, and the CLI prints the table."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from katjax import model, parallel
from katjax.plan import (GIB, device_memory_budget, largest_fitting_row, largest_row,
                          tree_step_memory)
from katjax.plan.table import check_row_fits, format_plan, plan_mesh
from katjax.train.state import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = model.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=128, remat=True, attention_impl="blockwise",
                        attention_block=64)


@pytest.fixture(scope="module")
def plan():
  mesh = parallel.make_mesh(1, 2, 2, devices=jax.devices()[:4])
  return mesh, plan_mesh(CFG, mesh, row_tokens=512, decode_batch=4, cache_len=256,
                         optimizer=make_optimizer())


def _device0_bytes(tree):
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


def test_plan_bytes_equal_a_real_sharded_state(plan):
  mesh, p = plan
  params = parallel.shard_params(model.init(CFG, jax.random.PRNGKey(0)),
                                 model.logical_axes(CFG), mesh)
  assert p.train.params == _device0_bytes(params)
  # AdamW: two float32 moments per weight, sharded like it, plus a few replicated scalars
  assert 0 <= p.train.optimizer - 2 * p.train.params < 1024
  assert p.decode.params == p.train.params
  # fsdp x tensor = 4 devices: each holds well under the whole model
  whole = sum(x.nbytes for x in jax.tree.leaves(params))
  assert p.train.params < whole / 2
  # arguments: the state plus this device's batch row ([R, S] arrays of 4 bytes, R = 2 rows
  # over fsdp = 2; jit drops the arrays the loss does not read)
  assert p.train.arguments > p.train.params + p.train.optimizer + 10 * 512 * 4
  assert p.train.temporaries > p.train_half.temporaries > 0
  assert p.train.peak > p.train_half.peak


def test_largest_row_is_the_linear_fit_rounded_down():
  # peak = 50 + 50 * S / 256 bytes: 125 fits S = 384; 60 fits S = 51, below one block
  assert largest_row([(256, 100), (512, 150)], 125, 64) == 384
  assert largest_row([(512, 150), (256, 100)], 149, 64) == 448
  assert largest_row([(256, 100), (512, 150)], 60, 64) == 0
  with pytest.raises(ValueError, match="does not grow"):
    largest_row([(256, 100), (512, 100)], 60, 64)


def test_largest_row_and_the_too_long_row_error(plan):
  _, p = plan
  assert largest_row([(256, p.train_half.peak), (512, p.train.peak)], p.train.peak, 64) == 512
  budget = (p.train_half.peak + p.train.peak) / 2 / GIB
  devices = {"small": budget}
  p.largest["small"] = largest_row([(256, p.train_half.peak), (512, p.train.peak)],
                                   budget * GIB, 64)
  assert 256 <= p.largest["small"] < 512
  with pytest.raises(ValueError, match=r"row of 512 tokens does not fit mesh \(1, 2, 2\) on "
                     r"small .* the largest row that fits is 3\d\d tokens"):
    check_row_fits([p], "small", devices)
  table = format_plan([p])
  assert "| (1, 2, 2) | 4 |" in table and "H100 (80 GiB): fits / largest row" in table


def test_sequence_axis_splits_the_row(plan):
  _, p = plan  # mesh (1, 2, 2): the same model and rows, each row whole on its devices
  mesh = parallel.make_mesh(1, 2, 2, sequence=2)
  q = tree_step_memory(CFG, mesh, 2, 512, optimizer=make_optimizer())
  # the row's activations are split over the two sequence devices; the weights are not
  assert q.temporaries < 0.75 * p.train.temporaries
  assert q.params == p.train.params
  with pytest.raises(ValueError, match="row_tokens=257 .* sequence axis of 2 devices"):
    plan_mesh(CFG, mesh, row_tokens=257, decode_batch=4, cache_len=256)


@pytest.mark.slow
def test_sequence_mesh_plan_names_the_largest_row_that_fits():
  mesh = parallel.make_mesh(1, 2, 2, sequence=2)
  q = plan_mesh(CFG, mesh, row_tokens=512, decode_batch=4, cache_len=256,
                optimizer=make_optimizer())
  assert q.mesh == (1, 2, 2, 2) and "| (1, 2, 2, 2) | 8 |" in format_plan([q])
  budget = (q.train_half.peak + q.train.peak) / 2 / GIB
  devices = {"small": budget}
  q.largest["small"] = largest_row([(256, q.train_half.peak), (512, q.train.peak)],
                                   budget * GIB, 128)  # whole 64-token blocks on both parts
  assert 256 <= q.largest["small"] < 512 and q.largest["small"] % 128 == 0
  with pytest.raises(ValueError, match=r"row of 512 tokens does not fit mesh \(1, 2, 2, 2\) "
                     rf"on small .* the largest row that fits is {q.largest['small']} tokens"):
    check_row_fits([q], "small", devices)


@pytest.mark.slow
def test_cli_prints_the_table_and_rejects_a_bad_mesh():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  cmd = [sys.executable, "-m", "katjax.plan", f"--config={ROOT}/configs/tiny.py",
         "--mesh=2,1,2", "--row_tokens=256", "--decode_batch=4"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| (2, 1, 2) | 4 |" in out.stdout and "tree step, row of 256 tokens" in out.stdout
  bad = subprocess.run(cmd[:4] + ["--mesh=2,x"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
  assert bad.returncode != 0 and "--mesh='2,x'" in bad.stderr


def test_largest_fitting_row_probes_a_bracket():
  """Against a brute-force scan of a convex, growing peak (quadratic like dense attention):
  the exact largest row within the default six probes (each one a compile in the stage)."""
  probes = []

  def peak_of(t):
    probes.append(t)
    return 1000 + t + t * t // 4096

  for budget in (1500, 3000, 5000, 9000):
    want = max([t for t in range(64, 8192, 64) if peak_of(t) <= budget] or [0])
    top = peak_of(8192)
    probes.clear()
    got = largest_fitting_row(peak_of, 8192, top, budget, 64)
    assert got == want, (budget, got, want, probes)
    assert len(probes) <= 6 and all(t % 64 == 0 for t in probes)
  assert largest_fitting_row(peak_of, 8192, peak_of(8192), 10, 64) == 0  # nothing fits
  # a floor: only rows above it are probed
  probes.clear()
  largest_fitting_row(peak_of, 8192, peak_of(8192), 5000, 64, floor=1024)
  assert min(probes) > 1024


def test_device_memory_budget_sources():
  class Dev:
    process_index, device_kind = 0, "fake"

    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  assert device_memory_budget([Dev(None)]) == (None, "no device memory limit known")
  got, source = device_memory_budget([Dev({"bytes_limit": 5 * GIB}), Dev({"bytes_limit": GIB})])
  assert got == GIB and "fake bytes_limit" in source  # the smallest device decides
  assert device_memory_budget([Dev({"bytes_limit": GIB})], 2.5) == (int(2.5 * GIB),
                                                                    "train.memory_budget_gib")
