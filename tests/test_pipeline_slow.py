"""--stage=all learns: success(rl) > success(sft) > success(base) on the held-out split.

A shortened pipeline (no RFT, short mid) with fixed seeds. The assertion is interval
separation: each stage's 95% Wilson interval lies wholly above the previous one's, so the
margins (recorded below as measured) are larger than the intervals' noise. Then a rerun
skips every finished stage, and a lost checkpoint is a clear error.
"""

import json
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import pipeline_tiny  # noqa: E402


def _config():
  c = pipeline_tiny.get_config()
  c.pipeline.update(mid_steps=10, rft_steps=0)
  c.eval.num_tasks = 200
  return c


@pytest.mark.slow
def test_pipeline_orders_the_stages_on_heldout_tasks(tmp_path, capsys):
  from katjax.stages import all as all_stage
  out = all_stage.run(_config(), str(tmp_path))
  by = {s["stage"]: s for s in out["stages"]}
  assert list(by) == ["base", "mid", "sft", "rl"]
  assert by["base"]["success"] < 0.02  # a random model cannot guess 2-digit values
  # Interval separation: lower end of the later stage above the upper end of the earlier.
  assert by["sft"]["ci95"][0] > by["base"]["ci95"][1], by
  assert by["rl"]["ci95"][0] > by["sft"]["ci95"][1], by
  assert os.path.getsize(tmp_path / "figure5.png") > 0
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["stages"][0]) == {"stage", "success", "ci95", "mean_turns",
                                     "parallel_call_share", "wall_s"}
  capsys.readouterr()
  again = all_stage.run(_config(), str(tmp_path))  # everything finished: all skipped
  assert again == saved
  assert capsys.readouterr().out.count("finished in an earlier run, skipped") == 4
  os.remove(tmp_path / "rl" / "eval.json")
  shutil.rmtree(tmp_path / "sft" / "checkpoints")
  with pytest.raises(ValueError, match="stage 'sft' is marked finished .* no checkpoint"):
    all_stage.run(_config(), str(tmp_path))
