"""Trajectory manager: token-exact sessions, branches on rewritten history, staleness, state."""

import json
import threading
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from katjax.core.tree import build_tree
from katjax.flow.trajectories import RecordingBackend, TrajectoryManager


class ScriptedBackend:
  """A stand-in engine: returns the next scripted output and logs exactly what it saw."""

  def __init__(self, outputs, version=0):
    self.outputs, self.seen, self.version = list(outputs), [], version

  def generate(self, prompts, sampling=None, **kw):
    out = []
    for p in prompts:
      toks = np.asarray(self.outputs.pop(0), np.int32)
      self.seen.append((list(map(int, p)), list(map(int, toks))))
      out.append([SimpleNamespace(tokens=toks, logprobs=-0.1 * (1 + np.arange(len(toks))),
                                  entropy=np.full(len(toks), 0.5, np.float32))])
    return out


def test_multi_turn_session_is_one_token_exact_branch():
  mgr = TrajectoryManager(group_size=1, batch_groups=1)
  mgr.start_group("t0", ["s"])
  eng = ScriptedBackend([[10, 11], [12], [13, 14, 15]])
  be = RecordingBackend(eng, mgr, "s")
  history = [1, 2, 3]
  for tool_result in ([20, 21], [22], None):
    (comp,), = be.generate([history])
    history = history + list(comp.tokens) + (tool_result or [])
    if tool_result is None:
      break
  (branch,) = mgr.branches("s")
  last_prompt, last_out = eng.seen[-1]
  assert branch.tokens == last_prompt + last_out  # exactly what the engine consumed/produced
  outputs = {i for p, o in eng.seen for i in range(len(p), len(p) + len(o))}
  assert [i for i, m in enumerate(branch.loss_mask) if m] == sorted(outputs)
  assert branch.logprobs[3:5] == pytest.approx([-0.1, -0.2])
  assert mgr.stats["prefix_mismatches"] == 0 and mgr.stats["calls"] == 3


def test_rewritten_history_starts_a_counted_branch_and_trains_each_output_once():
  mgr = TrajectoryManager(group_size=1, batch_groups=1)
  mgr.start_group("t0", ["s"])
  mgr.record("s", [1, 2, 3], [10, 11, 12])          # turn 1: reasoning 10 11, call 12
  mgr.record("s", [1, 2, 3, 10, 11, 12, 20], [13])  # turn 2 after a tool result
  # A template that drops earlier reasoning re-sends turn 1 without 10 11.
  info = mgr.record("s", [1, 2, 3, 12, 20, 13, 21], [14])
  assert info == {"branch": 1, "new_branch": True, "mismatch": True}
  assert mgr.stats["prefix_mismatches"] == 1
  b0, b1 = mgr.branches("s")
  assert b1.tokens == [1, 2, 3, 12, 20, 13, 21, 14]
  assert b1.loss_mask == [0, 0, 0, 0, 0, 0, 0, 1]  # re-sent ids are context, never trained
  trained = [t for b in (b0, b1) for t, m in zip(b.tokens, b.loss_mask) if m]
  assert sorted(trained) == [10, 11, 12, 13, 14]
  # A retry of turn 2 (same prompt again) forks without counting a mismatch.
  mgr.record("s", [1, 2, 3, 10, 11, 12, 20], [16])
  assert mgr.stats["prefix_mismatches"] == 1 and mgr.stats["forks"] == 1


def test_interleaved_sessions_from_threads_give_the_right_trees():
  mgr = TrajectoryManager(group_size=3, batch_groups=2, eta=None)
  rng = np.random.default_rng(0)
  expected = {}
  scripts = {}
  for g in range(2):
    ids = [f"g{g}s{k}" for k in range(3)]
    mgr.start_group(f"task{g}", ids)
    prompt = list(rng.integers(100, 200, 5))
    for k, s in enumerate(ids):
      turns = [(list(rng.integers(0, 50, 3)), list(rng.integers(50, 100, 2))) for _ in range(3)]
      turns[0] = (list(rng.integers(0, 50, 2 + k)), turns[0][1])
      scripts[s] = (prompt, turns)
      toks, mask = list(prompt), [0] * len(prompt)
      for out, tool in turns:
        toks += out + tool
        mask += [1] * len(out) + [0] * len(tool)
      expected[s] = (toks[:-2], mask[:-2])  # the last tool result is never sent

  def agent(s):
    prompt, turns = scripts[s]
    hist = list(prompt)
    for i, (out, tool) in enumerate(turns):
      mgr.record(s, hist, out)
      hist = hist + out + tool
    mgr.finish(s, reward=float(len(s)))

  threads = [threading.Thread(target=agent, args=(s,)) for s in scripts]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  groups, info = mgr.take_batch()
  assert {k: info[k] for k in ("staleness", "max_staleness", "version")} == {
      "staleness": 0.0, "max_staleness": 0, "version": 0}
  # The lineage names each group by content: crc32 over (int32 length, int32 ids) per branch.
  crcs = []
  for g in range(2):
    crc = 0
    for k in range(3):
      ids = np.asarray(expected[f"g{g}s{k}"][0], np.int32)
      crc = zlib.crc32(np.int32(ids.size).tobytes() + ids.tobytes(), crc)
    crcs.append(crc)
  assert info["lineage"] == [{"id": g, "fingerprint": crcs[g], "versions": [0, 0]}
                             for g in range(2)]
  for g, group in enumerate(groups):
    got = build_tree(group)
    for k, traj in enumerate(group):
      toks, mask = expected[f"g{g}s{k}"]
      mask = np.asarray(mask)
      mask[0] = 0
      np.testing.assert_array_equal(traj.tokens, toks)
      np.testing.assert_array_equal(traj.loss_mask, mask)
    assert got.num_tokens < sum(len(t) for t in group)  # the shared prompt is stored once


def test_versions_and_staleness_across_a_weight_update():
  mgr = TrajectoryManager(group_size=1, batch_groups=1, eta=2)
  mgr.start_group("t", ["s"])
  mgr.record("s", [1, 2], [3, 4])         # version 0
  mgr.set_version(1)                      # weights swapped mid-episode
  mgr.record("s", [1, 2, 3, 4, 9], [5])   # version 1
  mgr.finish("s", 1.0)
  mgr.set_version(2)
  (branch,) = mgr.branches("s")
  assert [v for v, m in zip(branch.version, branch.loss_mask) if m] == [0, 0, 1]
  _, info = mgr.take_batch()
  assert info["staleness"] == pytest.approx((2 + 2 + 1) / 3) and info["max_staleness"] == 2


def test_admission_follows_the_staleness_bound():
  with pytest.raises(ValueError, match="eta"):
    TrajectoryManager(group_size=2, batch_groups=1, eta=-1)
  sync = TrajectoryManager(group_size=2, batch_groups=2, eta=0)
  started = 0
  while sync.can_admit(2):
    sync.start_group("t", [f"a{started}", f"b{started}"])
    started += 1
  assert started == 2  # one batch (2 groups x 2) per version: the synchronous schedule
  with pytest.raises(RuntimeError, match="staleness"):
    sync.start_group("t", ["x", "y"])
  sync.set_version(1)
  assert sync.can_admit(4) and not sync.can_admit(5)
  loose = TrajectoryManager(group_size=2, batch_groups=2, eta=1)
  assert loose.can_admit(8) and not loose.can_admit(9)  # eta = 1: one batch ahead


def test_unknown_session_abort_and_state_round_trip():
  mgr = TrajectoryManager(group_size=2, batch_groups=1, eta=None)
  mgr.record("stray", [1], [2])
  assert mgr.stats["unknown_sessions"] == 1
  mgr.start_group("t1", ["a", "b"])
  mgr.start_group("t2", ["c", "d"])
  for s in "abc":
    mgr.record(s, [1, 2], [ord(s)])
  mgr.finish("a", 1.0)
  assert mgr.abort("c") == "t2"  # its group is dropped whole, the task comes back
  assert "d" not in mgr.sessions and mgr.stats["aborted"] == 1
  mgr.finish("b", 0.0)
  restored = TrajectoryManager(group_size=2, batch_groups=1, eta=None)
  restored.load_state_dict(json.loads(json.dumps(mgr.state_dict())))
  for m in (mgr, restored):
    groups, _ = m.take_batch()
    assert [list(t.tokens) for t in groups[0]] == [[1, 2, ord("a")], [1, 2, ord("b")]]
    assert [t.reward for t in groups[0]] == [1.0, 0.0]
    assert m.take_batch() is None  # nothing is trained twice
  restored.finish("stray", 0.0)
  with pytest.raises(ValueError, match="already finished"):
    restored.finish("stray", 0.0)
  with pytest.raises(ValueError, match="already finished"):
    restored.record("stray", [1, 2], [3])


def test_trained_trajectories_carry_each_tokens_version():
  mgr = TrajectoryManager(group_size=1, batch_groups=1)
  mgr.start_group("t", ["s"])
  mgr.record("s", [1, 2], [3, 4], version=[0, 1])  # weights changed inside the call
  mgr.set_version(1)
  mgr.record("s", [1, 2, 3, 4, 9], [5])
  mgr.finish("s", 1.0)
  (group,), _ = mgr.take_batch()
  np.testing.assert_array_equal(group[0].version, [0, 0, 0, 1, 0, 1])  # context: 0
  np.testing.assert_array_equal(group[0].loss_mask, [0, 0, 1, 1, 0, 1])
  assert group[0].policy_version == 0  # the oldest trained token


def test_a_dropped_groups_running_sibling_is_ignored_not_recorded_as_a_new_session():
  mgr = TrajectoryManager(group_size=2, batch_groups=1, eta=0)
  mgr.start_group("t", ["a", "b"])
  mgr.record("a", [1, 2], [3])
  mgr.record("b", [1, 2], [4])
  assert mgr.abort("a") == "t"  # a's agent died; b is still running
  assert mgr.record("b", [1, 2, 4, 5], [6])["branch"] is None  # a late call of b
  mgr.finish("b", 1.0)  # and b's grade: both ignored, counted
  assert mgr.stats["late_calls"] == 2 and mgr.stats["unknown_sessions"] == 0
  assert mgr.sessions == {} and mgr.groups == {} and mgr.take_batch() is None
  assert (mgr.accepted, mgr.running) == (0, 0) and mgr.can_admit(2)  # the capacity came back
