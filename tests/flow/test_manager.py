"""The trajectory manager behind the HTTP server, driven by the real `openai` client.

A scripted engine answers (no compilation); the test checks the recorded ids against what
the engine consumed and produced, branch creation on a rewritten history, and interleaved
sessions.
"""

import types

import numpy as np
import openai
import pytest

from katjax.flow import TrajectoryManager
from katjax.model import ByteTokenizer
from katjax.rollout.engine import EngineRequest
from katjax.rollout.sampler import Completion
from katjax.rollout.server import serve

TOK = ByteTokenizer()


class ScriptedEngine:
  """Answers call k with f"answer {k}" + <|im_end|>, version k; records what it consumed."""

  rows = 16

  def __init__(self):
    self.sampler = types.SimpleNamespace(max_len=4096)
    self.consumed = []

  def submit(self, prompt, sampling, n=1, seed=0, top_logprobs=0):
    k = len(self.consumed)
    ids = TOK.encode(f"answer {k}") + [TOK.eos_id]
    self.consumed.append((list(map(int, prompt)), ids))
    req = EngineRequest(np.asarray(prompt), sampling, n, None, 0)
    req.started = req.finished = req.submitted
    m = len(ids)
    req.result = [Completion(tokens=np.asarray(ids, np.int32),
                             logprobs=np.full(m, -0.1 * (k + 1), np.float32),
                             raw_logprobs=np.zeros(m, np.float32), entropy=np.zeros(m, np.float32),
                             finish_reason="stop", prompt_len=len(prompt),
                             version=np.full(m, k, np.int32))]
    req.event.set()
    return req

  def cancel(self, req):
    pass

  def snapshot(self):
    return {}

  def close(self):
    pass


@pytest.fixture
def proxy():
  engine, manager = ScriptedEngine(), TrajectoryManager()
  srv = serve(engine, TOK, recorder=manager)
  yield srv, engine, manager
  srv.close()


def _client(srv, session):
  return openai.OpenAI(base_url=f"{srv.url}/sessions/{session}/v1", api_key="none")


def test_ids_recorded_equal_ids_consumed_and_produced(proxy):
  srv, engine, manager = proxy
  a, b = _client(srv, "a"), _client(srv, "b")
  hist = {"a": [{"role": "user", "content": "task A"}], "b": [{"role": "user", "content": "B"}]}
  for turn in range(2):  # interleaved: a, b, a, b
    for name, client in (("a", a), ("b", b)):
      msg = client.chat.completions.create(model="m", messages=hist[name]).choices[0].message
      hist[name] += [{"role": "assistant", "content": msg.content},
                     {"role": "user", "content": f"more {turn}"}]
  assert manager.stats["sessions"] == 2 and manager.stats["prefix_mismatches"] == 0
  for name, calls in (("a", [0, 2]), ("b", [1, 3])):
    (traj,) = manager.trajectories(name)
    prompt, out = engine.consumed[calls[-1]]
    # the branch is exactly the last call's input ids followed by its output ids
    np.testing.assert_array_equal(traj.tokens, prompt + out)
    gen = np.zeros(len(prompt) + len(out), np.int8)
    first_prompt, first_out = engine.consumed[calls[0]]
    gen[len(first_prompt):len(first_prompt) + len(first_out)] = 1
    gen[len(prompt):] = 1
    np.testing.assert_array_equal(traj.loss_mask, gen)
    np.testing.assert_allclose(traj.logprobs[len(prompt):], -0.1 * (calls[-1] + 1), rtol=1e-6)
    assert traj.policy_version == calls[0]


def test_rewritten_history_starts_a_counted_branch(proxy):
  srv, engine, manager = proxy
  client = _client(srv, "s")
  hist = [{"role": "user", "content": "task"}]
  msg = client.chat.completions.create(model="m", messages=hist).choices[0].message
  # the scaffold rewrites the assistant turn (as templates that drop reasoning do)
  hist += [{"role": "assistant", "content": msg.content + " (edited)"},
           {"role": "user", "content": "next"}]
  client.chat.completions.create(model="m", messages=hist)
  assert manager.stats["prefix_mismatches"] == 1
  first, second = manager.trajectories("s")
  np.testing.assert_array_equal(second.tokens, engine.consumed[1][0] + engine.consumed[1][1])
  # both branches share the prompt of the first call: the tree merges them there
  shared = len(engine.consumed[0][0])
  np.testing.assert_array_equal(first.tokens[:shared], second.tokens[:shared])
