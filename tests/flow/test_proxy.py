"""An unmodified OpenAI-API scaffold (the `openai` client, tools, streaming) through the
trajectory manager: the recorded ids are exactly the engine's, and they train one step."""

import json
import threading
import time

import jax
import numpy as np
import openai
import optax

from katjax.core.losses import PolicyLossConfig
from katjax.core.tree import build_tree
from katjax.flow.learner import TreeLearner
from katjax.flow.proxy import serve_recorded
from katjax.flow.trajectories import TrajectoryManager
from katjax.model import TINY, ByteTokenizer, init
from katjax.rollout.engine import EngineRequest
from katjax.rollout.sampler import Completion
from katjax.train.state import TrainState

TOK = ByteTokenizer()
CFG = TINY.replace(vocab_size=272)
CALC = {"type": "function", "function": {"name": "calculator", "description": "math",
                                         "parameters": {"type": "object", "properties": {
                                             "expression": {"type": "string"}}}}}


class ScriptedEngine:
  """Engine stand-in that logs what it consumed and produced: a tool call first, an answer
  once the prompt holds a tool response; tokens stream one by one."""

  rows = 8

  def __init__(self):
    self.sampler = type("S", (), {"max_len": 4096})()
    self.log, self.lock, self.answers = [], threading.Lock(), 0

  def submit(self, prompt, sampling, n=1, seed=0, top_logprobs=0):
    req = EngineRequest(np.asarray(prompt), sampling, n, None, top_logprobs)
    threading.Thread(target=self._run, args=(req,), daemon=True).start()
    return req

  def _run(self, req):
    req.started = time.monotonic()
    answered = "<tool_response>" in TOK.decode(list(req.prompt))
    with self.lock:
      self.answers += answered
      nth = self.answers
    text = (f"The sum is 5 (answer {nth})." if answered else
            '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n'
            '</tool_call>')
    ids = TOK.encode(text) + [TOK.eos_id]
    for tok in ids:
      req._out[0]["tokens"].append(tok)
      with req.updated:
        req.updated.notify_all()
    k = len(ids)
    rng = np.random.default_rng(k)
    req.result = [Completion(tokens=np.array(ids, np.int32),
                             logprobs=-rng.random(k).astype(np.float32),
                             raw_logprobs=np.zeros(k, np.float32),
                             entropy=rng.random(k).astype(np.float32), finish_reason="stop",
                             prompt_len=len(req.prompt), text=text,
                             version=np.full(k, 3, np.int32))]
    with self.lock:
      self.log.append(([int(t) for t in req.prompt], ids))
    req.finished = time.monotonic()
    req.event.set()

  def cancel(self, req):
    req.cancelled = True

  def snapshot(self):
    return {}

  def close(self):
    pass


def scaffold(base_url: str) -> str:
  """What an agent framework does: stream, collect tool-call deltas, run tools, repeat."""
  client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
  messages = [{"role": "user", "content": "What is 2+3? Use the calculator."}]
  for _ in range(4):
    content, calls = "", {}
    for chunk in client.chat.completions.create(model="tiny", messages=messages, tools=[CALC],
                                                stream=True, max_tokens=128):
      if not chunk.choices:
        continue
      delta = chunk.choices[0].delta
      content += delta.content or ""
      for tc in delta.tool_calls or []:
        call = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
        call["name"] += tc.function.name or ""
        call["arguments"] += tc.function.arguments or ""
    msg = {"role": "assistant", "content": content}
    if calls:
      msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
          "name": c["name"], "arguments": c["arguments"]}} for c in calls.values()]
    messages.append(msg)
    if not calls:
      return content
    for c in calls.values():
      expr = json.loads(c["arguments"])["expression"]
      messages.append({"role": "tool", "tool_call_id": c["id"],
                       "content": str(sum(int(x) for x in expr.split("+")))})
  return ""


def test_scaffold_episodes_are_recorded_exactly_and_train_one_step():
  engine = ScriptedEngine()
  manager = TrajectoryManager(group_size=2, batch_groups=1, eta=None)
  manager.start_group("2+3", ["ep0", "ep1"])
  with serve_recorded(engine, TOK, manager, model_name="tiny") as srv:
    answers = {}
    threads = [threading.Thread(target=lambda e=e: answers.__setitem__(
        e, scaffold(f"{srv.url}/sessions/{e}/v1"))) for e in ("ep0", "ep1")]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
  assert sorted(answers.values()) == ["The sum is 5 (answer 1).", "The sum is 5 (answer 2)."]
  assert len(engine.log) == 4 and manager.stats["calls"] == 4  # two turns per episode
  branches = manager.branches("ep0") + manager.branches("ep1")
  for prompt, out in engine.log:  # every call is in a branch exactly as the engine saw it
    n = len(prompt)
    assert any(b.tokens[:n + len(out)] == prompt + out and all(b.loss_mask[n:n + len(out)])
               and b.version[n:n + len(out)] == [3] * len(out) for b in branches)
  trained = sum(sum(b.loss_mask) for b in branches)
  assert trained == sum(len(out) for _, out in engine.log)  # each output trained once
  for e in ("ep0", "ep1"):
    manager.finish(e, reward=1.0 if e == "ep0" else 0.0)
  (group,), _ = manager.take_batch()
  assert build_tree(group).num_tokens < sum(len(t) for t in group)  # the prompt is shared
  params = init(CFG, jax.random.PRNGKey(0))
  opt = optax.sgd(0.1)
  learner = TreeLearner(CFG, TrainState.create(params, opt, jax.random.PRNGKey(1)), opt,
                        PolicyLossConfig(), num_rows=1, row_tokens=2048)
  before = jax.tree.map(np.array, params)  # copies: the step donates the state
  new, metrics = learner.train([group])
  assert np.isfinite(metrics["loss"])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new, before)
  assert max(jax.tree.leaves(moved)) > 0
