"""`--stage=rl` end to end on the tiny model: rollouts -> prefix trees -> pruned tree step."""

import json
import os
import re

import jax
import numpy as np
import pytest

from katjax import model as kmodel
from katjax.envs.toy import ArithmeticEnv
from katjax.launch import _DEFAULT_CONFIG  # noqa: F401  (the launcher imports cleanly)
from katjax.stages import rl as rl_stage
from katjax.testing import compile_cache


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """The stage runs here rebuild the same programs (resume, RL then RFT): compile each once."""
  with compile_cache.persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


def _config(steps):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "rl_tiny", os.path.join(os.path.dirname(__file__), "..", "configs", "rl_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.steps = steps
  c.train.checkpoint_every = 1
  c.rl.update(tasks_per_step=1, group_size=3, max_turns=1, max_new_tokens=24, max_tokens=1024,
              num_rows=1, row_tokens=2048)
  c.mesh.update(data=1, fsdp=1, tensor=-1)  # one row: the fake devices split the heads
  return c


@pytest.fixture
def random_rewards(monkeypatch):
  """A random tiny model never solves a task: draw rewards so advantages are not all zero."""
  draws = iter(np.random.default_rng(0).random(100))
  monkeypatch.setattr(ArithmeticEnv, "evaluate", lambda self: (float(next(draws)), {}))


def test_rl_stage_trains_on_pruned_trees_and_resumes(tmp_path, random_rewards):
  c = _config(2)
  # A known device budget: the stage runs the executable it compiled and checked at start.
  c.train.memory_budget_gib = 1000.0
  summary = rl_stage.train_rl(c, str(tmp_path))
  assert summary["start_step"] == 0 and sorted(summary["loss"]) == [1, 2]
  logged = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
  assert [m["step"] for m in logged] == [1, 2]
  for m in logged:
    assert 0 < m["kept_tokens"] <= m["tree_tokens"] <= m["flat_tokens"]
    assert m["kept_tokens"] <= 2048  # one row of 2048 tokens
    assert np.isfinite(m["loss"]) and 0 <= m["bubble"] <= 1
  # Three rollouts of one prompt share it: the tree stores the prompt once.
  assert logged[0]["tree_tokens"] < logged[0]["flat_tokens"]
  # Non-zero advantages move the weights away from the initial ones (same init key).
  cfg = kmodel.ModelConfig(**dict(_config(2).model))
  init = kmodel.init(cfg, jax.random.split(jax.random.PRNGKey(0))[0])
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       summary["state"].params, init)
  assert max(jax.tree.leaves(moved)) > 1e-6
  # Resume: a third step continues from the step-2 checkpoint.
  again = rl_stage.train_rl(_config(3), str(tmp_path))
  assert again["start_step"] == 2 and sorted(again["loss"]) == [3]


def test_rl_stage_rejects_rows_that_cannot_hold_a_trajectory(tmp_path):
  c = _config(2)
  c.rl.row_tokens = 512
  with pytest.raises(ValueError, match="rl.max_tokens=1024 > rl.row_tokens=512"):
    rl_stage.train_rl(c, str(tmp_path))


def test_rl_stage_rejects_rows_the_sequence_axis_cannot_split(tmp_path):
  c = _config(2)
  c.mesh.update(tensor=1, sequence=8)
  c.rl.row_tokens = 2044
  with pytest.raises(ValueError, match=r"rl.row_tokens=2044 is not divisible by "
                                       r"mesh.sequence=8"):
    rl_stage.train_rl(c, str(tmp_path))


def test_rl_stage_rejects_a_prompt_longer_than_max_tokens(tmp_path):
  c = _config(2)
  c.rl.max_tokens = 256  # the byte-level arithmetic prompt is ~960 tokens
  with pytest.raises(ValueError, match=r"prompt alone has \d+ tokens >= rl.max_tokens=256"):
    rl_stage.train_rl(c, str(tmp_path))


@pytest.mark.slow  # ~90 s on 2 busy cores: four compiles of the tree step on 8 fake devices
def test_rl_stage_rejects_a_row_longer_than_the_devices_hold(tmp_path):
  """train.memory_budget_gib below the tree step's peak: the stage stops before any rollout,
  naming rl.row_tokens and the largest row that fits (the next block would not)."""
  from katjax import parallel
  from katjax.plan import GIB, tree_step_memory
  from katjax.train.config import parse
  from katjax.train.state import make_optimizer
  c = _config(2)
  # Short rows keep the compiles cheap; rows in steps of 64 tokens (dense attention below
  # dense_max_len: memory grows faster than linearly, the search still holds).
  c.model.attention_block = 64
  c.rl.update(row_tokens=512, max_tokens=512)
  run = parse(c)
  mesh = parallel.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)

  def peak(tokens):  # the plan's own compile of the same step, from abstract inputs
    return tree_step_memory(run.model, mesh, run.rl.num_rows, tokens,
                            optimizer=make_optimizer(run.optimizer),
                            loss_cfg=run.rl.policy_loss()).peak

  low, high = peak(256), peak(512)
  assert low < high
  budget = (low + high) // 2
  c.train.memory_budget_gib = budget / GIB
  with pytest.raises(ValueError, match=r"rl.row_tokens=512 does not fit: .* over the .* GiB "
                                       r"of train.memory_budget_gib; the largest row that fits "
                                       r"is (\d+) tokens") as e:
    rl_stage.train_rl(c, str(tmp_path))
  assert (tmp_path / "logs" / "metrics.jsonl").read_text() == ""  # no step ran
  largest = int(re.search(r"the largest row that fits is (\d+)", str(e.value)).group(1))
  assert 256 <= largest < 512 and largest % 64 == 0
  assert peak(largest) <= budget < (high if largest + 64 == 512 else peak(largest + 64))


def test_the_run_seed_varies_the_rollout_seeds(monkeypatch):
  """train.seed reaches the episodes: a seed study runs different rollouts per seed."""
  from katjax.rollout.batch import episode_seed
  from katjax.train.config import parse

  class Seen(Exception):
    pass

  def capture(sampler, tokenizer, envs, tasks, sampling, limits, *, seed, monitors):
    raise Seen([episode_seed(seed, i) for i in range(len(tasks))])

  monkeypatch.setattr(rl_stage, "run_episodes", capture)
  rl = parse(_config(1)).rl
  tasks = rl_stage.load_rl_tasks(rl)[:2]

  def seeds(run_seed, step):
    with pytest.raises(Seen) as seen:
      rl_stage.collect_groups(None, None, tasks, rl, step=step, seed=run_seed)
    return seen.value.args[0]

  runs = {(s, k): seeds(s, k) for s in (0, 1, 2) for k in (0, 1)}
  every = [x for v in runs.values() for x in v]
  assert len(set(every)) == len(every)  # no episode seed repeats across seeds and steps
  assert seeds(1, 1) == runs[1, 1]  # the same seed and step: the same rollouts
