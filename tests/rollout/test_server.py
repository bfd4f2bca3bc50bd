"""The HTTP server with the real `openai` client, bad input, overload, disconnects; the client.

Most tests put a scripted sampler behind the server (fixed text, optional delay that polls
`cancelled` like the real sampler's chunk loop), so HTTP behaviour is tested without
compiling; one test serves the real tiny-model `Sampler` and checks the answer against a
direct `Sampler.generate` call.
"""

import concurrent.futures
import json
import socket
import time
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
from katjax.rollout.server import serve

TOK = ByteTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "description": "math",
                                         "parameters": {"type": "object", "properties": {
                                             "expression": {"type": "string"}}}}}
TOOL_TEXT = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": '
             '{"expression": "2+3"}}\n</tool_call>')


class FakeSampler:
  """Sampler stand-in: answers `text` + <|im_end|> after `delay` s, polling `cancelled`."""

  max_len = 4096

  def __init__(self, text, delay=0.0):
    self.text, self.delay, self.batches, self.cancelled = text, delay, [], []
    self.weights = []

  def update_weights(self, params):
    self.weights.append((params, len(self.batches)))

  def generate(self, prompts, params, n=1, keys=None, cancelled=None, seed=0):
    self.batches.append(len(prompts))
    t0, out = time.monotonic(), []
    while time.monotonic() - t0 < self.delay:
      if cancelled and all(cancelled(i) for i in range(len(prompts))):
        self.cancelled.append(len(prompts))
        break
      time.sleep(0.01)
    for i, _ in enumerate(prompts):
      ids = TOK.encode(self.text) + [TOK.eos_id]
      k = len(ids)
      out.append([Completion(tokens=np.array(ids, np.int32), logprobs=np.full(k, -0.25, np.float32),
                             raw_logprobs=np.full(k, -0.5, np.float32),
                             entropies=np.ones(k, np.float32), finish_reason="stop",
                             prompt_len=len(prompts[i]), text=TOK.decode(ids))
                  for _ in range(n)])
    return out


@pytest.fixture
def fake_server():
  servers = []

  def start(text=TOOL_TEXT, delay=0.0, **kw):
    sampler = FakeSampler(text, delay)
    srv = serve(sampler, TOK, model_name="tiny", **kw)
    servers.append(srv)
    return srv, sampler

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
    (dict(messages=[{"role": "user", "content": "x"}], max_tokens=10 ** 6), "context"),
    (dict(messages=[{"role": "user", "content": "x"}], stream=True), "'stream'"),
    (dict(messages=[{"role": "user", "content": "x"}], tool_choice="bogus"), "'tool_choice'"),
    (dict(messages=[{"role": "user", "content": "x"}], stop=[1]), "'stop'"),
    (dict(messages=[]), "'messages'"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages"),
])
def test_invalid_requests_get_400(fake_server, body, needle):
  srv, sampler = fake_server()
  status, payload = post(srv.url, body)
  assert status == 400 and needle in payload["error"]["message"]
  assert payload["error"]["type"] == "invalid_request_error"
  assert sampler.batches == []


def test_concurrent_requests_are_batched(fake_server):
  srv, sampler = fake_server(text="ok", delay=0.2, batch_wait=0.1)
  body = dict(messages=[{"role": "user", "content": "x"}], max_tokens=10)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: post(srv.url, body), range(4)))
  assert all(s == 200 and p["choices"][0]["message"]["content"] == "ok" for s, p in results)
  assert max(sampler.batches) > 1 and sum(sampler.batches) == 4


def test_weight_update_applies_between_batches(fake_server):
  srv, sampler = fake_server(text="ok")
  body = dict(messages=[{"role": "user", "content": "x"}], max_tokens=10)
  assert post(srv.url, body)[0] == 200
  srv.engine.update_weights("v2")
  assert sampler.weights == []  # nothing running: applied when the next batch starts
  assert post(srv.url, body)[0] == 200
  assert sampler.weights == [("v2", 1)]


def test_overload_gets_503(fake_server):
  srv, _ = fake_server(text="ok", delay=1.0, max_queue=1)
  body = dict(messages=[{"role": "user", "content": "x"}], max_tokens=10)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    first = pool.submit(post, srv.url, body)
    _wait(lambda: health(srv.url)["running"] == 1)
    second = pool.submit(post, srv.url, body)
    _wait(lambda: health(srv.url)["queued"] == 1)
    status, payload = post(srv.url, body)
    assert status == 503 and "overloaded" in payload["error"]["message"]
    assert first.result()[0] == 200 and second.result()[0] == 200


def test_client_disconnect_frees_the_slot(fake_server):
  srv, sampler = fake_server(text="ok", delay=30.0)
  host, port = srv.url.split("//")[1].split(":")
  data = json.dumps(dict(messages=[{"role": "user", "content": "x"}])).encode()
  sock = socket.create_connection((host, int(port)))
  sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
               b"application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n"
               + data)
  _wait(lambda: health(srv.url)["running"] == 1)
  t0 = time.monotonic()
  sock.close()
  _wait(lambda: health(srv.url)["running"] == 0 and sampler.cancelled)
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


def test_real_sampler_behind_server_matches_direct_call():
  cfg = TINY.replace(vocab_size=272)
  sampler = Sampler(cfg, init(cfg, jax.random.PRNGKey(0)), max_len=256, tokenizer=TOK,
                    chunk=8)
  messages = [{"role": "user", "content": "Hello there"}]
  with serve(sampler, TOK) as srv:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    resp = client.chat.completions.create(model="katjax", messages=messages, temperature=0,
                                          max_tokens=12, logprobs=True)
    got = resp.choices[0].model_extra["token_ids"]
    via_client = OpenAIClient(srv.url).generate(
        [TOK.encode_chat(messages, add_generation_prompt=True)[0]],
        SamplingParams(temperature=0.0, max_new_tokens=12))[0][0]
  ids, _ = TOK.encode_chat(messages, add_generation_prompt=True)
  (direct,), = sampler.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=12))
  assert got == direct.tokens.tolist() == via_client.tokens.tolist()
  np.testing.assert_allclose([c.logprob for c in resp.choices[0].logprobs.content],
                             direct.raw_logprobs, atol=1e-6)
  np.testing.assert_allclose(via_client.entropies, direct.entropies, atol=1e-6)


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
