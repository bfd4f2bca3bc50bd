"""Lock-step episodes: the same records as the one-at-a-time agent loop, one call per turn."""

import numpy as np

from katjax.data import lookup
from katjax.data.bpe import train_bpe
from katjax.envs.base import make_env
from katjax.rollout import agent
from katjax.rollout.agent import AgentLimits
from katjax.rollout.batch import run_episodes
from katjax.rollout.sampler import Completion, SamplingParams


class ScriptedBackend:
  """Plays each task's episode turn by turn: the teacher for even levels, the expert-style
  serial plan for odd ones, and a malformed call for task ids in `broken`."""

  def __init__(self, tokenizer, tasks, broken=()):
    self.tok, self.broken, self.calls = tokenizer, set(broken), []
    self.by_question = {lookup.question(t): t for t in tasks}

  def generate(self, prompts, params, *, keys=None, cancelled=None, seed=0, n=1):
    assert keys is None or len(keys) == len(prompts)
    self.calls.append(len(prompts))
    out = []
    for p in prompts:
      text = self.tok.decode(p)
      question = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
      task = self.by_question[question]
      turn = text.count("<|im_start|>assistant\n") - 1
      if task["id"] in self.broken:
        body = "<tool_call>\nnot json\n</tool_call>"
      else:
        episode = lookup.teacher_episode(task)
        assistant = [m for m in episode if m["role"] == "assistant"]
        body = self.tok.render_chat([assistant[turn]]).split("assistant\n", 1)[1]
        body = body[:body.rindex("<|im_end|>")]
      ids = np.asarray(self.tok.encode(body + "<|im_end|>"), np.int32)
      z = np.zeros(len(ids), np.float32)
      out.append([Completion(ids, z, z, z + 0.5, "stop", len(p))])
    return out


def test_batched_records_equal_the_sequential_agent_loop():
  tasks = lookup.generate_tasks(12, "train", seed=5)
  tok = train_bpe(lookup.mid_corpus(300), 400)
  limits = AgentLimits(max_turns=3, max_tokens=1024, max_new_tokens=96)
  broken = {tasks[2]["id"]}
  backend = ScriptedBackend(tok, tasks, broken)
  envs = [make_env("lookup") for _ in tasks]
  batched = run_episodes(backend, tok, envs, tasks, SamplingParams(max_new_tokens=96), limits)
  # One generate call per turn, serving every episode still running.
  assert backend.calls[0] == len(tasks) and len(backend.calls) == 3
  # Turn 3: the chain tasks and the broken one (its calls fail, it never submits).
  assert backend.calls[-1] == sum(t["level"] == 3 or t["id"] in broken for t in tasks)
  for task, got in zip(tasks, batched):
    want = agent.run_episode(ScriptedBackend(tok, tasks, broken), tok, make_env("lookup"),
                             task, SamplingParams(max_new_tokens=96), limits)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.loss_mask, want.loss_mask)
    np.testing.assert_array_equal(got.flags, want.flags)
    np.testing.assert_array_equal(got.turn_starts, want.turn_starts)
    assert (got.reward, got.finish_reason, got.num_tool_calls, got.parallel_turns) == (
        want.reward, want.finish_reason, want.num_tool_calls, want.parallel_turns)
    if task["id"] in broken:
      assert got.reward == 0.0 and got.num_tool_errors >= 1
    else:
      assert got.reward == 1.0 and got.finish_reason == "submitted"
      assert got.parallel_turns == (1 if task["level"] in (2, 4) else 0)
