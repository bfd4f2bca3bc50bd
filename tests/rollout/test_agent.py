"""Agent loop: concurrency of tool calls, token-exact records, malformed calls, limits.

A scripted backend plays the model (fixed assistant texts, token ids from the tokenizer) so
the expected conversation is known independently of the loop.
"""

import json
import time

import numpy as np
import pytest

from katjax.core.fields import TOOL_CALL, TOOL_ERROR, TOOL_RESULT
from katjax.envs.base import Environment, tool_spec
from katjax.model import ByteTokenizer
from katjax.rollout.agent import AgentLimits, run_episode
from katjax.rollout.sampler import Completion, SamplingParams

TOK = ByteTokenizer()


def call(name, **args):
  return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


class Scripted:
  """Backend returning fixed texts (+ <|im_end|>); records the prompts it was given."""

  def __init__(self, texts, close=True, version=None):
    self.texts, self.close, self.prompts, self.generated = list(texts), close, [], []
    self.version = version  # per-token policy version to report (None: not reported)

  def generate(self, prompts, sampling, n=1, seed=0, cancelled=None):
    (prompt,) = prompts
    self.prompts.append([int(t) for t in prompt])
    text = self.texts[min(len(self.generated), len(self.texts) - 1)]
    ids = TOK.encode(text) + ([TOK.eos_id] if self.close else [])
    cut = ids[:sampling.max_new_tokens]
    self.generated.append(cut)
    k = len(cut)
    rng = np.random.default_rng(len(self.generated))
    comp = Completion(tokens=np.array(cut, np.int32),
                      logprobs=-rng.random(k).astype(np.float32),
                      raw_logprobs=-rng.random(k).astype(np.float32),
                      entropy=rng.random(k).astype(np.float32),
                      finish_reason="stop" if cut and cut[-1] == TOK.eos_id else "length",
                      prompt_len=len(prompt))
    if self.version is not None:
      comp.version = np.full(k, self.version + len(self.generated), np.int32)
    return [[comp]]


class SleepEnv(Environment):
  def reset(self, task):
    self.done = False
    self.tools = [tool_spec("nap", "sleep", {"seconds": {"type": "number"}}),
                  tool_spec("submit", "finish", {"answer": {"type": "string"}})]
    self.answer = None
    return [{"role": "user", "content": task["q"]}], self.tools

  def tool_nap(self, seconds):
    time.sleep(float(seconds))
    return f"slept {seconds}"

  def tool_submit(self, answer):
    self.answer, self.done = answer, True
    return "ok"

  def evaluate(self):
    return float(self.answer == "42"), {"answer": self.answer}


def test_parallel_calls_run_concurrently_and_record_is_token_exact():
  backend = Scripted([call("nap", seconds=0.5) + "\n" + call("nap", seconds=0.5),
                      "thinking\n" + call("submit", answer="42")])
  t0 = time.monotonic()
  ro = run_episode(backend, TOK, SleepEnv(), {"q": "answer?"})
  elapsed = time.monotonic() - t0
  assert elapsed < 0.85, f"two 0.5 s tools took {elapsed:.2f} s: not concurrent"
  assert ro.finish_reason == "submitted" and ro.reward == 1.0
  assert ro.num_tool_calls == 3 and ro.parallel_turns == 1 and ro.num_tool_errors == 0
  # every prompt the model saw is exactly the recorded prefix before its turn
  assert len(backend.prompts) == ro.num_turns == 2
  for k, prompt in enumerate(backend.prompts):
    assert prompt == ro.tokens[:ro.turn_starts[k]].tolist()
  # mask 1 exactly on generated tokens, which are the model's ids verbatim
  np.testing.assert_array_equal(ro.tokens[ro.loss_mask == 1], sum(backend.generated, []))
  for k in range(ro.num_turns):
    assert ro.loss_mask[ro.turn_starts[k]:ro.turn_ends[k]].all()
  assert ro.loss_mask.sum() == sum(len(g) for g in backend.generated)
  assert (ro.logprobs[ro.loss_mask == 0] == 0).all()
  # independent check: the token sequence is the chat template of the final conversation
  # (the episode ended after tool results, so the next assistant header closes the record)
  rendered = TOK.render_chat(ro.messages, SleepEnv().reset({"q": ""})[1],
                             add_generation_prompt=True)
  assert TOK.decode(ro.tokens) == rendered
  # event flags: call tokens are the <tool_call> blocks, result tokens hold the results
  call_text = TOK.decode(ro.tokens[(ro.flags & TOOL_CALL) > 0])
  assert call_text.count("<tool_call>") == 3 and call_text.count("</tool_call>") == 3
  assert "thinking" not in call_text
  result_text = TOK.decode(ro.tokens[(ro.flags & TOOL_RESULT) > 0])
  assert result_text.count("slept 0.5") == 2 and "ok" in result_text
  assert not (ro.flags & TOOL_RESULT)[ro.loss_mask == 1].any()


def test_malformed_calls_become_error_observations():
  backend = Scripted([
      "<tool_call>\n{not json}\n</tool_call>\n" + call("teleport", where="moon") + "\n"
      + call("nap", duration=1),
      "no more tools, the answer is 42"])
  ro = run_episode(backend, TOK, SleepEnv(), {"q": "?"})
  assert ro.finish_reason == "answer" and ro.reward == 0.0
  assert ro.num_tool_errors == 3 and ro.num_tool_calls == 3
  tool_msgs = [m for m in ro.messages if m["role"] == "tool"]
  assert len(tool_msgs) == 3 and all(m["content"].startswith("Error") for m in tool_msgs)
  assert "unknown tool 'teleport'" in " ".join(m["content"] for m in tool_msgs)
  assert (ro.flags & TOOL_ERROR).any()


def test_limits_turns_tokens_time():
  loop = Scripted([call("nap", seconds=0)])
  ro = run_episode(loop, TOK, SleepEnv(), {"q": "?"}, limits=AgentLimits(max_turns=3))
  assert ro.finish_reason == "max_turns" and ro.num_turns == 3
  budget = len(TOK.encode_chat(*SleepEnv().reset({"q": "?"}), add_generation_prompt=True)[0])
  ro = run_episode(Scripted([call("nap", seconds=0)]), TOK, SleepEnv(), {"q": "?"},
                   limits=AgentLimits(max_tokens=budget + 20))
  assert ro.finish_reason == "max_tokens" and len(ro.tokens) <= budget + 20
  assert ro.loss_mask.sum() == 20
  slow = Scripted([call("nap", seconds=0.3)])
  ro = run_episode(slow, TOK, SleepEnv(), {"q": "?"},
                   limits=AgentLimits(max_turns=50, max_seconds=0.5))
  assert ro.finish_reason == "timeout" and ro.num_turns <= 3


def test_unclosed_turn_ends_episode():
  ro = run_episode(Scripted(["partial answer"], close=False), TOK, SleepEnv(), {"q": "?"},
                   SamplingParams(max_new_tokens=64))
  assert ro.finish_reason == "length" and ro.num_turns == 1


def test_rollouts_feed_the_prefix_tree():
  from katjax.core.tree import build_tree

  texts = [call("nap", seconds=0), "done"]
  a = run_episode(Scripted(texts), TOK, SleepEnv(), {"q": "same"})
  b = run_episode(Scripted([texts[0], "other end"]), TOK, SleepEnv(), {"q": "same"})
  ta, tb = a.to_tree(), b.to_tree()
  np.testing.assert_array_equal(ta.tokens, a.tokens)
  np.testing.assert_array_equal(ta.flags, a.flags)
  tree = build_tree([ta, tb])
  # the two rollouts share everything before the last turn
  shared = int(np.argmax(a.tokens[:len(b.tokens)] != b.tokens[:len(a.tokens)]))
  assert shared == a.turn_starts[1]  # "done" vs "other end" differ at the first token
  assert len(tree.tokens) == len(a.tokens) + len(b.tokens) - shared


def test_version_per_token_comes_from_the_completion():
  texts = [call("nap", seconds=0), "done"]
  ro = run_episode(Scripted(texts, version=6), TOK, SleepEnv(), {"q": "?"})
  # Turn k was generated by version 6 + k + 1; prompt and tool tokens carry 0.
  want = np.zeros(len(ro.tokens), np.int32)
  for k in range(ro.num_turns):
    want[ro.turn_starts[k]:ro.turn_ends[k]] = 7 + k
  np.testing.assert_array_equal(ro.version, want)
  np.testing.assert_array_equal(ro.to_tree().version, want)
  plain = run_episode(Scripted(texts), TOK, SleepEnv(), {"q": "?"})  # backend without versions
  assert plain.version.dtype == np.int32 and not plain.version.any()


class FlakyEnv(SleepEnv):
  """SleepEnv failing at one stage; counts close() calls."""

  def __init__(self, fail=None):
    super().__init__()
    self.fail, self.closed = fail, 0

  def reset(self, task):
    if self.fail == "reset":
      raise KeyError("q")
    return super().reset(task)

  def evaluate(self):
    if self.fail == "evaluate":
      raise RuntimeError("grader down")
    return super().evaluate()

  def close(self):
    self.closed += 1


class Crashing:
  def generate(self, prompts, sampling, n=1, seed=0, cancelled=None):
    raise ConnectionError("server gone")


def test_failures_are_recorded_never_raised_and_the_env_is_always_closed():
  script = [call("submit", answer="42")]
  env = FlakyEnv()
  ro = run_episode(Scripted(script), TOK, env, {"q": "?"})
  assert ro.error is None and ro.reward == 1.0 and env.closed == 1
  env = FlakyEnv("reset")
  ro = run_episode(Scripted(script), TOK, env, {})
  assert ro.error == "reset: KeyError: 'q'" and ro.finish_reason == "error"
  assert ro.reward == 0.0 and len(ro.tokens) == 0 and env.closed == 1
  assert "KeyError" in ro.info["traceback"]
  env = FlakyEnv()
  ro = run_episode(Crashing(), TOK, env, {"q": "?"})
  assert ro.error == "generate: ConnectionError: server gone" and env.closed == 1
  assert len(ro.tokens) > 0 and not ro.loss_mask.any()  # the prompt is kept
  env = FlakyEnv("evaluate")
  ro = run_episode(Scripted(script), TOK, env, {"q": "?"})
  assert ro.error == "evaluate: RuntimeError: grader down" and ro.reward == 0.0
  assert ro.num_turns == 1 and ro.loss_mask.sum() == len(TOK.encode(script[0])) + 1
  assert env.closed == 1


def test_bad_limits():
  with pytest.raises(ValueError, match="max_turns"):
    AgentLimits(max_turns=0)


def test_deviation_monitor_ends_the_episode_and_masks_the_deviating_turns():
  from katjax.rollout.deviation import DeviationConfig, DeviationMonitor
  backend = Scripted([call("nap", seconds=0.01), call("nap", duration=1),
                      call("submit", answer="42")])
  tools = SleepEnv().reset({"q": ""})[1]
  monitor = DeviationMonitor(tools=tools, config=DeviationConfig(min_similarity=None))
  ro = run_episode(backend, TOK, SleepEnv(), {"q": "?"}, monitor=monitor)
  # Turn 1 calls nap with a wrong argument: schema patience 1 stops the episode there.
  assert ro.finish_reason == "deviation" and "invalid tool calls" in ro.info["deviation"]
  assert ro.num_turns == 2 and len(backend.prompts) == 2
  cut = ro.turn_starts[1]
  assert ro.loss_mask[ro.turn_starts[0]:ro.turn_ends[0]].all()  # the good turn still trains
  assert not ro.loss_mask[cut:].any()  # the deviating turn does not
  # The record is still exactly what the model saw and generated.
  np.testing.assert_array_equal(ro.tokens[ro.turn_starts[1]:ro.turn_ends[1]],
                                backend.generated[1])
  assert backend.prompts[1] == ro.tokens[:cut].tolist()
