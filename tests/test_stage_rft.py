"""`--stage=rft`: rewards relative to the teacher, the teacher as a branch, the loop end to end."""

import json
import os

import numpy as np
import pytest

from katjax.core.tree import build_tree
from katjax.envs.toy import ArithmeticEnv, generate_tasks
from katjax.model import ByteTokenizer
from katjax.rollout.agent import AgentLimits, run_episode
from katjax.rollout.sampler import Completion
from katjax.stages import rft as rft_stage
from katjax.stages import rl as rl_stage
from katjax.testing import compile_cache


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """The stage runs here rebuild the same programs (resume, RL then RFT): compile each once."""
  with compile_cache.persistent_compile_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
    yield


TOK = ByteTokenizer()


class Scripted:
  """Backend that 'generates' a fixed text (+ <|im_end|>) each turn."""

  def __init__(self, text):
    self.ids = TOK.encode(text) + [TOK.eos_id]

  def generate(self, prompts, sampling, n=1, seed=0, cancelled=None):
    k = len(self.ids)
    return [[Completion(tokens=np.array(self.ids, np.int32), logprobs=np.zeros(k, np.float32),
                        raw_logprobs=np.zeros(k, np.float32),
                        entropy=np.ones(k, np.float32), finish_reason="stop",
                        prompt_len=len(prompts[0]))]]


def _rft_config(outcome_weight=0.5, monitor=False):
  import ml_collections
  return ml_collections.ConfigDict(dict(
      metric="lcs", outcome_weight=outcome_weight, monitor=monitor, patience=2,
      schema_patience=1, min_similarity=0.2, teacher_branch=True))


def _submit(answer):
  return ('<tool_call>\n' + json.dumps({"name": "submit", "arguments": {"answer": answer}})
          + '\n</tool_call>')


def test_rewards_are_lcs_similarity_to_the_teacher_mixed_with_the_outcome(lcs_ref):
  task = generate_tasks(1, seed=5)[0]
  rewards = rft_stage.RftRewards(TOK, "arithmetic", _rft_config(outcome_weight=0.25))
  texts = [_submit(str(task["answer"])), _submit(str(task["answer"] + 1)), "no idea"]
  limits = AgentLimits(max_turns=1, max_tokens=4096, max_new_tokens=512)
  rollouts = [run_episode(Scripted(t), TOK, ArithmeticEnv(), task, limits=limits)
              for t in texts]
  got = rewards.rewards(task, rollouts)
  # Independent: the teacher's generated ids from the chat template, LCS by plain DP.
  messages, tools = ArithmeticEnv().reset(task)
  ids, mask = TOK.encode_chat(messages + rft_stage.arithmetic_teacher(task), tools)
  teacher = [int(i) for i in ids[mask == 1]]
  for r, text, value in zip(rollouts, texts, got):
    gen = TOK.encode(text) + [TOK.eos_id]
    sim = 2 * lcs_ref(gen, teacher) / (len(gen) + len(teacher))
    expected = 0.75 * sim + 0.25 * r.reward
    np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert [r.reward for r in rollouts] == [1.0, 0.0, 0.0]
  assert got[0] > got[1] > got[2]


def test_teacher_branch_shares_the_prompt_with_the_rollouts():
  task = generate_tasks(1, seed=6)[0]
  rewards = rft_stage.RftRewards(TOK, "arithmetic", _rft_config())
  teacher = rewards.teacher(task)
  limits = AgentLimits(max_turns=1, max_tokens=4096, max_new_tokens=512)
  rollout = run_episode(Scripted("no idea"), TOK, ArithmeticEnv(), task, limits=limits)
  prompt_len = int(rollout.turn_starts[0])
  np.testing.assert_array_equal(teacher.tokens[:prompt_len], rollout.tokens[:prompt_len])
  assert teacher.loss_mask[:prompt_len].sum() == 0 and teacher.loss_mask.sum() > 0
  tree = build_tree([rollout.to_tree(), teacher])
  assert tree.num_tokens <= len(rollout.tokens) + len(teacher.tokens) - prompt_len


def test_rft_stage_runs_with_monitor_and_teacher(tmp_path):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "rft_tiny.py")
  spec = importlib.util.spec_from_file_location("rft_tiny", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.train.steps = 2
  c.rl.update(tasks_per_step=1, group_size=2, max_turns=1, max_new_tokens=24,
              max_tokens=1024, num_rows=1, row_tokens=2048)
  c.mesh.update(data=1, fsdp=1, tensor=-1)
  summary = rl_stage.train_rl(c, str(tmp_path),
                              rft=rft_stage.RftRewards(TOK, "arithmetic", c.rl.rft))
  logged = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
  assert [m["step"] for m in logged] == [1, 2]
  for m in logged:
    # The teacher (reward 1) beats random rollouts: non-zero advantages, a real loss.
    assert m["trained_tokens"] > 0 and np.isfinite(m["loss"]) and m["loss"] != 0
    assert m["tree_tokens"] < m["flat_tokens"]  # three branches share one prompt
    assert 0 <= m["reward_mean"] < 1
  assert summary["steps"] == 2
