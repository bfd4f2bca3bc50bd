"""The HTTP server with the real `openai` client, bad input, overload, disconnects; the client.

Most tests put a scripted sampler behind the server (fixed text, optional delay that polls
`cancelled` like the real sampler's chunk loop), so HTTP behaviour is tested without
compiling; one test serves the real tiny-model `Sampler` and checks the answer against a
direct `Sampler.generate` call.
"""

import concurrent.futures
import json
import logging
import socket
import threading
import time
import types
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest

from katjax.model import TINY, ByteTokenizer, init
from katjax.rollout.agent import AgentLimits, run_episode
from katjax.rollout.client import OpenAIClient, ServerError
from katjax.rollout.sampler import Completion, Sampler, SamplingParams
from katjax.rollout.engine import Engine, EngineRequest, Overloaded
from katjax.rollout.server import serve

TOK = ByteTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "description": "math",
                                         "parameters": {"type": "object", "properties": {
                                             "expression": {"type": "string"}}}}}
TOOL_TEXT = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": '
             '{"expression": "2+3"}}\n</tool_call>')


class FakeEngine:
  """Engine stand-in: answers `text` + <|im_end|> token by token over `delay` s, polling
  cancellation like the real engine's chunk loop. HTTP behaviour without compiling."""

  rows = 16

  def __init__(self, text, delay=0.0, overloaded=False):
    self.text, self.delay, self.overloaded = text, delay, overloaded
    self.sampler = types.SimpleNamespace(max_len=4096)
    self.requests, self.cancelled, self.running = [], [], 0

  def submit(self, prompt, sampling, n=1, seed=0, top_logprobs=0):
    if self.overloaded:
      raise Overloaded("server overloaded: 1 requests already queued (max_queue=1)")
    req = EngineRequest(np.asarray(prompt), sampling, n, None, top_logprobs)
    self.requests.append(req)
    threading.Thread(target=self._run, args=(req,), daemon=True).start()
    return req

  def _run(self, req):
    self.running += 1
    req.started = time.monotonic()
    ids = TOK.encode(self.text) + [TOK.eos_id]
    for t, tok in enumerate(ids):
      t0 = time.monotonic()
      while time.monotonic() - t0 < self.delay / len(ids) and not req.cancelled:
        time.sleep(0.01)
      if req.cancelled:
        break
      for j in range(req.n):
        req._out[j]["tokens"].append(tok)
      with req.updated:
        req.updated.notify_all()
    self.running -= 1
    k = len(ids)
    req.result = [Completion(tokens=np.array(ids, np.int32), logprobs=np.full(k, -0.25, np.float32),
                             raw_logprobs=np.full(k, -0.5, np.float32),
                             entropy=np.ones(k, np.float32), finish_reason="stop",
                             prompt_len=len(req.prompt), text=TOK.decode(ids),
                             top_logprobs=[([i, 0], [-0.5, -2.0]) for i in ids])
                  for _ in range(req.n)]
    req.finished = time.monotonic()
    req.event.set()

  def cancel(self, req):
    req.cancelled = True
    self.cancelled.append(req)

  def snapshot(self):
    return dict(running=self.running, cancelled=len(self.cancelled))

  def close(self):
    pass


@pytest.fixture
def fake_server():
  servers = []

  def start(text=TOOL_TEXT, delay=0.0, **kw):
    engine = FakeEngine(text, delay, **kw)
    srv = serve(engine, TOK, model_name="tiny")
    servers.append(srv)
    return srv, engine

  yield start
  for srv in servers:
    srv.close()


def post(url, body, timeout=30):
  req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def health(url):
  with urllib.request.urlopen(url + "/health", timeout=5) as r:
    return json.loads(r.read())


def test_openai_client_chat_with_tools(fake_server):
  srv, _ = fake_server()
  client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
  assert [m.id for m in client.models.list().data] == ["tiny"]
  resp = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "what is 2+3?"}], tools=[CALC],
      tool_choice="auto", n=2, temperature=0.5, max_tokens=100, logprobs=True)
  assert len(resp.choices) == 2
  choice = resp.choices[0]
  assert choice.finish_reason == "tool_calls"
  (tc,) = choice.message.tool_calls
  assert tc.function.name == "calculator" and json.loads(tc.function.arguments) == {
      "expression": "2+3"}
  assert choice.message.content == "Let me compute."
  assert len(choice.logprobs.content) == len(TOK.encode(TOOL_TEXT)) + 1
  assert choice.logprobs.content[0].logprob == -0.5
  # the prompt the server fed the model is the chat template of the request
  ids, _ = TOK.encode_chat([{"role": "user", "content": "what is 2+3?"}], [CALC],
                           add_generation_prompt=True)
  assert resp.model_extra["prompt_token_ids"] == ids.tolist()
  # tool_choice none: no parsing, the raw text comes back
  resp = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[CALC],
      tool_choice="none", max_tokens=100)
  assert resp.choices[0].message.tool_calls is None
  assert resp.choices[0].message.content == TOOL_TEXT


@pytest.mark.parametrize("body,needle", [
    (dict(messages=[{"role": "user", "content": "x"}], temperature=5), "'temperature'"),
    (dict(messages=[{"role": "user", "content": "x"}], top_p=0), "'top_p'"),
    (dict(messages=[{"role": "user", "content": "x"}], n=0), "'n'"),
    (dict(messages=[{"role": "user", "content": "x"}], max_tokens=-3), "'max_tokens'"),
    (dict(messages=[{"role": "user", "content": "x"}], stream="yes"), "'stream'"),
    (dict(messages=[{"role": "user", "content": "x"}], presence_penalty=0.5),
     "'presence_penalty'"),
    (dict(messages=[{"role": "user", "content": "x"}], logit_bias={"5": 1}), "'logit_bias'"),
    (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=21), "'top_logprobs'"),
    (dict(messages=[{"role": "user", "content": "x"}],
          response_format={"type": "json_object"}), "'response_format'"),
    (dict(messages=[{"role": "user", "content": "x"}], tool_choice="bogus"), "'tool_choice'"),
    (dict(messages=[{"role": "user", "content": "x"}], stop=[1]), "'stop'"),
    (dict(messages=[]), "'messages'"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages"),
])
def test_invalid_requests_get_400(fake_server, body, needle):
  srv, engine = fake_server()
  status, payload = post(srv.url, body)
  assert status == 400 and needle in payload["error"]["message"]
  assert payload["error"]["type"] == "invalid_request_error"
  assert payload["error"]["param"] in needle
  assert engine.requests == []


def test_context_overflow_is_openai_context_length_exceeded(fake_server):
  srv, engine = fake_server()
  client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
  with pytest.raises(openai.BadRequestError) as err:
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=10 ** 6)
  assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
  assert err.value.status_code == 400 and engine.requests == []


def test_harmless_fields_accepted_and_model_echoed(fake_server):
  srv, _ = fake_server(text="ok")
  status, body = post(srv.url, dict(
      model="my-agent-model", messages=[{"role": "user", "content": "x"}], max_tokens=10,
      response_format={"type": "text"}, logit_bias={}, presence_penalty=0,
      frequency_penalty=0.0, user="u1", parallel_tool_calls=True, logprobs=True,
      top_logprobs=2))
  assert status == 200 and body["model"] == "my-agent-model"
  top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
  assert [t["logprob"] for t in top] == [-0.5, -2.0]  # the engine's top ids, best first


def test_stream_with_tool_call_deltas(fake_server):
  srv, _ = fake_server(delay=0.3)
  client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
  stream = client.chat.completions.create(
      model="tiny", messages=[{"role": "user", "content": "what is 2+3?"}], tools=[CALC],
      stream=True, max_tokens=100, stream_options={"include_usage": True})
  content, calls, finish, usage, n_chunks = "", {}, None, None, 0
  for chunk in stream:
    n_chunks += 1
    usage = chunk.usage or usage
    for ch in chunk.choices:
      content += ch.delta.content or ""
      for tc in ch.delta.tool_calls or []:
        calls.setdefault(tc.index, {"name": "", "arguments": ""})
        calls[tc.index]["name"] += tc.function.name or ""
        calls[tc.index]["arguments"] += tc.function.arguments or ""
      finish = ch.finish_reason or finish
  assert n_chunks > 3  # content arrived in pieces, not one final blob
  assert content.strip() == "Let me compute." and "<tool_call>" not in content
  assert finish == "tool_calls" and calls[0]["name"] == "calculator"
  assert json.loads(calls[0]["arguments"]) == {"expression": "2+3"}
  assert usage.completion_tokens == len(TOK.encode(TOOL_TEXT)) + 1


def test_overload_gets_503(fake_server):
  srv, _ = fake_server(text="ok", overloaded=True)
  status, payload = post(srv.url, dict(messages=[{"role": "user", "content": "x"}]))
  assert status == 503 and "overloaded" in payload["error"]["message"]


def test_client_disconnect_frees_the_slot(fake_server):
  srv, engine = fake_server(text="ok", delay=30.0)
  host, port = srv.url.split("//")[1].split(":")
  data = json.dumps(dict(messages=[{"role": "user", "content": "x"}])).encode()
  sock = socket.create_connection((host, int(port)))
  sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
               b"application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n"
               + data)
  _wait(lambda: health(srv.url)["running"] == 1)
  t0 = time.monotonic()
  sock.close()
  _wait(lambda: health(srv.url)["running"] == 0 and engine.cancelled)
  assert time.monotonic() - t0 < 5  # far less than the 30 s the generation would take
  assert health(srv.url)["cancelled"] == 1


def test_client_backend_drives_the_agent_loop(fake_server):
  from katjax.envs.toy import ArithmeticEnv

  srv, _ = fake_server(text=TOOL_TEXT)
  client = OpenAIClient(srv.url)
  assert client.model == "tiny"
  ro = run_episode(client, TOK, ArithmeticEnv(), {"question": "2+3?", "answer": 5},
                   limits=AgentLimits(max_turns=2))
  assert ro.finish_reason == "max_turns" and ro.num_tool_calls == 2
  gen = TOK.encode(TOOL_TEXT) + [TOK.eos_id]
  np.testing.assert_array_equal(ro.tokens[ro.loss_mask == 1], gen + gen)
  np.testing.assert_allclose(ro.raw_logprobs[ro.loss_mask == 1], -0.5)
  with pytest.raises(ServerError, match="HTTP 400"):
    client.generate([[1, 2, 300]], SamplingParams(max_new_tokens=4))


def test_real_engine_behind_server(caplog):
  """Matches a direct Sampler call; streaming equals non-streaming; 4 concurrent clients
  share decode chunks; one log line per request; latency percentiles in /health."""
  cfg = TINY.replace(vocab_size=272)
  # The shapes of tests/rollout/test_engine.py (64 slots, 4 rows, chunk 8): shared programs.
  sampler = Sampler(cfg, init(cfg, jax.random.PRNGKey(0)), max_len=64, tokenizer=TOK, chunk=8)
  messages = [{"role": "user", "content": "Hello there"}]
  caplog.set_level(logging.INFO, logger="katjax.rollout.server")
  with serve(Engine(sampler, rows=4, min_cache=64), TOK) as srv:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    resp = client.chat.completions.create(model="katjax", messages=messages, temperature=0,
                                          max_tokens=12, logprobs=True)
    got = resp.choices[0].model_extra["token_ids"]
    via_client = OpenAIClient(srv.url).generate(
        [TOK.encode_chat(messages, add_generation_prompt=True)[0]],
        SamplingParams(temperature=0.0, max_new_tokens=12))[0][0]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="katjax", messages=messages, temperature=0, max_tokens=12, stream=True))
    body = dict(messages=messages, temperature=0.8, max_tokens=24)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(lambda i: post(srv.url, dict(body, seed=i)), range(4)))
    stats = health(srv.url)
  ids, _ = TOK.encode_chat(messages, add_generation_prompt=True)
  (direct,), = sampler.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=12))
  assert got == direct.tokens.tolist() == via_client.tokens.tolist()
  np.testing.assert_allclose([c.logprob for c in resp.choices[0].logprobs.content],
                             direct.raw_logprobs, atol=1e-6)
  # The engine ran this prompt in a 4-row pool on a cached prefix, the direct call alone:
  # float32 rounding of a different batch shape, hence a relative bound.
  np.testing.assert_allclose(via_client.entropy, direct.entropy, rtol=1e-6)
  assert streamed == resp.choices[0].message.content
  assert all(s == 200 for s, _ in results)
  assert stats["max_requests_per_chunk"] > 1 and stats["shared_chunks"] > 0
  assert stats["prefix_hit_tokens"] > 0  # the same chat prompt, re-sent
  assert stats["latency_p50"] <= stats["latency_p99"]
  lines = [r.getMessage() for r in caplog.records if "prompt_tokens=" in r.getMessage()]
  assert len(lines) == 7 and all("latency=" in m and "queue_wait=" in m for m in lines)


def _wait(cond, timeout=10.0):
  t0 = time.monotonic()
  while not cond():
    if time.monotonic() - t0 > timeout:
      raise AssertionError("condition not reached in time")
    time.sleep(0.02)


def test_serve_stage_starts_a_server():
  import importlib.util
  import os
  import threading

  from katjax.stages import serve as stage

  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "serve.py")
  spec = importlib.util.spec_from_file_location("serve_config", path)
  serve_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(serve_config)

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  config = serve_config.get_config()
  config.serve.port, config.serve.duration_s = port, 5.0
  result = {}
  thread = threading.Thread(target=lambda: result.update(stage.run(config, "/tmp")))
  thread.start()
  url = f"http://127.0.0.1:{port}"
  _wait(lambda: _models(url), timeout=120)
  assert _models(url) == ["katjax"]
  thread.join()
  assert result["url"] == url


def _models(url):
  try:
    with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
      return [m["id"] for m in json.loads(r.read())["data"]]
  except OSError:
    return None
