"""`katjax.stages.flow_learning` on a miniature pipeline: it builds the workdir up to SFT, then
trains sync and async RL for the same steps from that SFT checkpoint, evaluates all three on
the same held-out tasks. (A rerun reusing SFT and retraining RL from it was tested in the
flowlearn branch and dropped for CI time.)"""

import json
import os
import subprocess
import sys

import pytest

from katjax.testing import compile_cache
from katjax.train.init_from import latest_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2
# The pipeline's config at miniature sizes: 1 step of mid and SFT, RL with one task of 2
# rollouts per step, 6 held-out tasks. One device (pipeline_tiny's mesh).
CMD = [sys.executable, "-m", "katjax.stages.flow_learning",
       f"--config={os.path.join(ROOT, 'configs', 'pipeline_tiny.py')}",
       # A vocabulary the 300-document BPE fills: no model id the tokenizer cannot decode
       # (an untrained model samples those).
       "--config.pipeline.vocab_size=512", "--config.model.vocab_size=512",
       "--config.pipeline.mid_docs=300", "--config.pipeline.sft_episodes=16",
       "--config.pipeline.mid_steps=1", "--config.pipeline.sft_steps=1",
       "--config.pipeline.rft_steps=0",
       "--config.data.batch_size=2", "--config.rl.num_tasks=400",
       "--config.rl.tasks_per_step=1", "--config.rl.group_size=2", "--config.rl.max_turns=1",
       "--config.rl.max_new_tokens=16", "--config.rl.num_rows=1",
       "--config.rl.rollout_slots=2", "--config.eval.num_tasks=6"]


def _run(workdir, cache, steps, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1", **compile_cache.env(cache))
  cmd = CMD + [f"--config.pipeline.rl_steps={steps}", f"--workdir={workdir}", *extra]
  proc = subprocess.run(cmd, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "flow_learning.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_sync_and_async_train_the_same_steps_from_the_same_sft(tmp_path):
  workdir, cache = str(tmp_path / "run"), tmp_path / "jax_cache"
  out = _run(workdir, cache, STEPS)
  sft_dir = os.path.join(workdir, "sft")
  assert latest_step(sft_dir) == 1  # built here: base -> mid -> SFT, and nothing after it
  assert not os.path.exists(os.path.join(workdir, "rft"))
  assert out["start_stage"] == "sft"  # rft_steps=0: RL starts from SFT
  for mode in ("sync", "async"):
    res = out[mode]
    assert res["init_from"] == sft_dir and res["start_step"] == 0
    assert res["steps_trained"] == STEPS and sorted(res["reward_curve"]) == ["1", "2"]
    # The RL run's own checkpoint, not the JSON: it stopped after exactly STEPS steps.
    assert latest_step(os.path.join(workdir, "flow_learning", mode)) == STEPS
    assert res["n_tasks"] == out["start"]["n_tasks"] == 6
  assert out["steps"] == STEPS
  assert "mean_staleness" in out["async"] and "mean_staleness" not in out["sync"]
  lo, hi = out["sync"]["ci95"]
  assert out["async_within_sync_interval"] == (lo <= out["async"]["success"] <= hi)
  # Paired counts on the same tasks: solved-by-one-only differ by the difference in solved.
  # Greedy (config.eval) and sampled at rl.temperature (the policy RL trains).
  for sfx, get in (("", lambda m: out[m]), ("_sampled", lambda m: out[m]["sampled"])):
    for name, (x, y) in {"async_vs_sync": ("async", "sync"), "sync_vs_start": ("sync", "start"),
                         "async_vs_start": ("async", "start")}.items():
      pair = out["paired" + sfx][name]
      assert pair["only_first"] - pair["only_second"] == round(
          6 * (get(x)["success"] - get(y)["success"])), name + sfx

  # The bench's evaluation of SFT is the pipeline's: the same episodes as sft/eval.json.
  with open(os.path.join(sft_dir, "eval.json")) as f:
    piped = json.load(f)
  for key in ("success", "mean_turns", "mean_tool_calls", "finish_reasons"):
    assert out["start"][key] == piped[key], key

  # Two seeds (the stages before RL are reused): a sync and an async run per seed, and their
  # spread over the seeds.
  two = _run(workdir, cache, 1, "--seeds=0,3")
  assert two["seeds"] == [0, 3] and sorted(two["runs"]) == ["0", "3"]
  for seed in ("0", "3"):
    for mode in ("sync", "async"):
      assert two["runs"][seed][mode]["steps_trained"] == 1
      assert latest_step(os.path.join(workdir, "flow_learning", f"seed{seed}", mode)) == 1
  assert two["start"]["success"] == out["start"]["success"]  # the same start, reused
  for name, get in (("eval", lambda r: r), ("sampled", lambda r: r["sampled"])):
    across = two["across_seeds"][name]
    for mode in ("sync", "async"):
      per_seed = [get(two["runs"][s][mode])["success"] for s in ("0", "3")]
      assert across[mode]["success"] == pytest.approx(per_seed)
      assert across[mode]["mean"] == pytest.approx(sum(per_seed) / 2, abs=1e-4)


def test_across_seeds_is_the_t_interval_of_the_mean_over_runs():
  from katjax.stages.flow_learning import _across_seeds

  succ = {"sync": [0.4, 0.5, 0.6], "async": [0.2, 0.3, 0.4]}
  runs = {s: {m: {"success": succ[m][i]} for m in succ} for i, s in enumerate((0, 1, 2))}
  # Two tasks per seed; async solves task 0 where sync does not (seed 0), and sync solves
  # task 1 where async does not (seeds 1 and 2).
  solved = {0: {"sync": [0, 1], "async": [1, 1]}, 1: {"sync": [1, 1], "async": [1, 0]},
            2: {"sync": [0, 1], "async": [0, 0]}}
  out = _across_seeds(runs, {s: {m: {"": v} for m, v in d.items()} for s, d in solved.items()},
                      "")
  t = 4.302653  # t(0.975, 2 degrees of freedom), from a t table
  half = t * 0.1 / 3 ** 0.5  # sample sd 0.1 for both
  assert out["sync"]["mean"] == pytest.approx(0.5) and out["sync"]["sd"] == pytest.approx(0.1)
  assert out["sync"]["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-4)
  assert out["async"]["ci95"] == pytest.approx([0.3 - half, 0.3 + half], abs=1e-4)
  assert out["async_mean_within_sync_interval"]  # 0.3 > 0.5 - 0.248
  assert not out["async_mean_below_sync_interval"]
  assert out["paired_pooled"] == {"only_first": 1, "only_second": 2, "p": 1.0}


def test_seeds_must_be_distinct():
  from katjax.stages.flow_learning import run

  with pytest.raises(ValueError, match="seeds must be distinct"):
    run(_pipeline_config(), "/nonexistent", seeds=[1, 1])


def _pipeline_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "pipeline_tiny", os.path.join(ROOT, "configs", "pipeline_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()
