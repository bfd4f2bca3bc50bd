"""RFT deviation monitor (katjax/rollout/deviation.py): stops after `patience` bad turns and
not before, similarity against a plain-Python LCS, tool-schema checks, exact masking."""

import numpy as np
import pytest

from katjax.core.tree import Trajectory
from katjax.envs.base import ToolCall, tool_spec
from katjax.rollout.agent import Rollout
from katjax.rollout.deviation import (DeviationConfig, DeviationMonitor, generated_ids,
                                      patch_files, tool_call_problems, truncate_after)

TOOLS = [
  tool_spec("view", "Show a file.", {"path": {"type": "string"},
                                     "start_line": {"type": "integer"}}, required=["path"]),
  tool_spec("edit", "Edit a file.", {"path": {"type": "string"}, "old_str": {"type": "string"},
                                     "new_str": {"type": "string"}}),
]
NO_SIM = DeviationConfig(min_similarity=None)


def edit(path):
  return ToolCall(id="c", name="edit", arguments={"path": path, "old_str": "x", "new_str": "y"})


@pytest.mark.parametrize("patience", [1, 2, 4])
def test_files_outside_gold_patch_stop_after_patience_turns_not_before(patience):
  cfg = DeviationConfig(patience=patience, min_similarity=None)
  mon = DeviationMonitor(gold_files=["src/a.py"], tools=TOOLS, config=cfg)
  assert not mon([edit("./src/a.py")]).stop  # inside the gold patch (path normalised)
  for k in range(patience - 1):
    assert not mon([edit(f"lib/other{k}.py")]).stop
  verdict = mon([ToolCall("c", "view", {"path": "src/a.py"})], files_touched=["setup.py"])
  assert verdict.stop and verdict.check == "files" and "setup.py" in verdict.reason
  assert verdict.cut_turn == 1  # the streak began right after the good first turn
  assert mon([edit("src/a.py")]) == verdict  # sticky once stopped


def test_a_good_turn_resets_the_streak():
  mon = DeviationMonitor(gold_files=["a.py"], config=DeviationConfig(patience=3,
                                                                     min_similarity=None))
  pattern = ["b.py", "b.py", "a.py", "c.py", "c.py", "a.py", "d.py", "d.py"]
  assert not any(mon([edit(p)]).stop for p in pattern)
  verdict = mon([edit("d.py")])
  assert verdict.stop and verdict.cut_turn == 6


def test_reading_files_outside_the_gold_patch_is_fine():
  mon = DeviationMonitor(gold_files=["a.py"], tools=TOOLS, config=DeviationConfig(patience=1))
  assert not mon([ToolCall("c", "view", {"path": "elsewhere.py"})]).stop


def test_similarity_to_teacher_prefix_against_plain_lcs(lcs_ref):
  teachers = [np.arange(1, 31), np.arange(100, 112)]
  cfg = DeviationConfig(patience=2, min_similarity=0.5)
  mon = DeviationMonitor(teacher_ids=teachers, config=cfg)
  # Turn by turn the agent's generated ids so far: on track, then off, then a different path.
  turns = [list(range(1, 9)), list(range(1, 9)) + [50] * 10,
           list(range(1, 9)) + [50] * 10 + [77] * 20]
  for k, gen in enumerate(turns):
    expect = max(2 * lcs_ref(gen, list(t[:len(gen)])) / (len(gen) + len(t[:len(gen)]))
                 for t in teachers)
    verdict = mon(generated=np.array(gen))
    assert verdict.similarity == pytest.approx(expect, abs=1e-6)
    assert verdict.stop == (k == 2), (k, expect)
  assert mon.verdict.check == "similarity" and mon.verdict.cut_turn == 1
  assert [h["similarity"] < 0.5 for h in mon.history] == [False, True, True]


def test_edit_metric_and_second_teacher_counts():
  mon = DeviationMonitor(teacher_ids=[np.array([9, 9, 9]), np.array([1, 2, 3, 4])],
                         config=DeviationConfig(metric="edit", min_similarity=0.5))
  verdict = mon(generated=np.array([1, 2, 7]))  # vs [1, 2, 3]: one substitution in 3
  assert verdict.similarity == pytest.approx(2 / 3)


@pytest.mark.parametrize("call, what", [
  (ToolCall("c", "delete", {"path": "a.py"}), "unknown tool"),
  (ToolCall("c", "view", {"path": 3}), "wrong type ['path']"),
  (ToolCall("c", "view", {"path": "a.py", "start_line": True}), "wrong type ['start_line']"),
  (ToolCall("c", "view", {"path": "a.py", "mode": "r"}), "unexpected ['mode']"),
  (ToolCall("c", "edit", {"path": "a.py"}), "missing ['old_str', 'new_str']"),
  (ToolCall.from_openai({"function": {"name": "view", "arguments": "{bad"}}), "not a JSON"),
])
def test_invalid_tool_schema_stops_at_once_by_default(call, what):
  mon = DeviationMonitor(tools=TOOLS, config=NO_SIM)
  assert not mon([ToolCall("c", "view", {"path": "a.py", "start_line": 2})]).stop
  verdict = mon([call])
  assert verdict.stop and verdict.check == "schema" and what in verdict.reason
  assert verdict.cut_turn == 1


def test_schema_patience_and_malformed_blocks():
  mon = DeviationMonitor(tools=TOOLS, config=DeviationConfig(schema_patience=2,
                                                             min_similarity=None))
  assert not mon(malformed=1).stop
  assert not mon([edit("a.py")]).stop
  assert not mon(malformed=2).stop
  verdict = mon([ToolCall("c", "nope", {})])
  assert verdict.stop and verdict.cut_turn == 2
  assert tool_call_problems([edit("a.py")], {t["function"]["name"]: t["function"]
                                             for t in TOOLS}) == []


def _rollout():
  # prompt (4) | turn 0 (3 generated) | tool result (2) | turn 1 (3) | result (2) | turn 2 (2)
  mask = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1], np.int32)
  n = mask.size
  zeros = np.zeros(n, np.float32)
  return Rollout(tokens=np.arange(10, 10 + n, dtype=np.int32), loss_mask=mask, logprobs=zeros,
                 raw_logprobs=zeros, entropy=zeros, flags=np.zeros(n, np.int32),
                 turn_starts=np.array([4, 9, 14], np.int32),
                 turn_ends=np.array([7, 12, 16], np.int32), messages=[])


@pytest.mark.parametrize("cut", range(17))
def test_truncate_after_masks_exactly_the_tokens_from_the_cut(cut):
  rollout = _rollout()
  before_mask, before_tokens = rollout.loss_mask.copy(), rollout.tokens.copy()
  out = truncate_after(rollout, cut)
  expect = [m if i < cut else 0 for i, m in enumerate(before_mask)]
  assert out.loss_mask.tolist() == expect
  assert out.tokens.tolist() == before_tokens.tolist() and out.turn_starts is rollout.turn_starts
  assert rollout.loss_mask.tolist() == before_mask.tolist()  # input untouched
  traj = truncate_after(rollout.to_tree(), cut)
  assert isinstance(traj, Trajectory) and traj.loss_mask.tolist() == expect
  assert truncate_after(before_mask, cut).tolist() == expect


def test_monitor_cut_masks_the_deviating_turns_of_a_rollout():
  rollout = _rollout()
  mon = DeviationMonitor(gold_files=["a.py"], config=DeviationConfig(patience=2,
                                                                     min_similarity=None))
  verdicts = [mon([edit(p)]) for p in ("a.py", "b.py", "b.py")]
  assert [v.stop for v in verdicts] == [False, False, True]
  out = truncate_after(rollout, int(rollout.turn_starts[verdicts[-1].cut_turn]))
  assert generated_ids(out.tokens, out.loss_mask).tolist() == [14, 15, 16]  # turn 0 only


def test_patch_files_and_from_swe_task():
  diff = ("diff --git a/src/a.py b/src/a.py\n--- a/src/a.py\n+++ b/src/a.py\n@@ -1 +1 @@\n-x\n+y\n"
          "diff --git a/new.py b/new.py\n--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+z\n"
          "diff --git a/old.py b/renamed.py\n--- a/old.py\n+++ b/renamed.py\n")
  assert patch_files(diff) == ["src/a.py", "new.py", "old.py", "renamed.py"]
  mon = DeviationMonitor.from_swe_task({"patch": diff}, TOOLS, config=DeviationConfig(
      patience=1, min_similarity=None))
  assert not mon([edit("new.py"), edit("src/a.py")]).stop
  assert mon([edit("src/b.py")]).stop


@pytest.mark.parametrize("call, match", [
  (lambda: DeviationConfig(patience=0), "DeviationConfig.patience"),
  (lambda: DeviationConfig(schema_patience=1.5), "DeviationConfig.schema_patience"),
  (lambda: DeviationConfig(min_similarity=1.2), "DeviationConfig.min_similarity"),
  (lambda: DeviationConfig(metric="bleu"), "DeviationConfig.metric"),
  (lambda: DeviationConfig(edit_tools=("edit", "path")), "DeviationConfig.edit_tools"),
  (lambda: DeviationMonitor(teacher_ids=[np.zeros((2, 2), np.int32)]), r"teacher_ids\[0\]"),
  (lambda: DeviationMonitor(teacher_ids=[np.arange(3)])(generated=np.ones(2)), "generated"),
  (lambda: DeviationMonitor(config={"patience": 2}), "DeviationConfig"),
  (lambda: truncate_after(_rollout(), -1), "cut_index"),
  (lambda: truncate_after(_rollout(), 17), r"cut_index must be an int in \[0, 16\]"),
  (lambda: truncate_after(_rollout(), True), "cut_index"),
  (lambda: truncate_after([0, 1, 1], 1), "needs a Rollout"),
  (lambda: truncate_after(np.zeros((2, 2)), 1), "1-D"),
  (lambda: generated_ids(np.arange(3), np.ones(2)), "one shape"),
])
def test_bad_input_raises_clear_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()
