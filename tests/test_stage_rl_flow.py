"""`--stage=rl` with `rl.mode=async` (SeamlessFlow): trains, checkpoints the flow's state, and
a resumed run trains the groups that were waiting at the checkpoint once and none twice."""

import json
import os

import numpy as np
import pytest

from katjax.envs.toy import ArithmeticEnv
from katjax.flow import learner as learner_mod
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


@pytest.mark.slow
def test_async_rl_trains_and_resumes_without_losing_or_repeating_groups(tmp_path,
                                                                         monkeypatch):
  draws = iter(np.random.default_rng(0).random(1000))
  monkeypatch.setattr(ArithmeticEnv, "evaluate", lambda self: (float(next(draws)), {}))
  trained = []
  real_train = learner_mod.TreeLearner.train

  def recording_train(self, groups):
    trained.append([g[0].group_id for g in groups])
    return real_train(self, groups)

  monkeypatch.setattr(learner_mod.TreeLearner, "train", recording_train)
  first = rl_stage.train_rl(_config(2), str(tmp_path))
  assert first["start_step"] == 0 and sorted(first["loss"]) == [1, 2]
  assert all(np.isfinite(v) for v in first["loss"].values())
  assert first["flow"]["mode"] == "async" and first["flow"]["mean_staleness"] >= 0
  saved = json.load(open(tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json"))
  waiting = set(saved["manager"]["ready"])  # graded, untrained groups at the checkpoint
  run1 = [g for step in trained for g in step]
  trained.clear()
  second = rl_stage.train_rl(_config(4), str(tmp_path))
  assert second["start_step"] == 2 and sorted(second["loss"]) == [3, 4]
  run2 = [g for step in trained for g in step]
  assert not set(run1) & set(run2)  # nothing trained twice
  assert len(run2) == len(set(run2)) == 2
  assert waiting <= set(run2)  # what was waiting at the checkpoint is trained after resume
  logged = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
  assert [m["step"] for m in logged] == [1, 2, 3, 4]


def test_async_mode_bad_config():
  c = _config(1)
  c.rl.eta = -1
  with pytest.raises(ValueError, match="config.rl.eta"):
    rl_stage.train_rl(c, "/nonexistent")
