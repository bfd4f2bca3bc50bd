"""OpenAI-compatible HTTP server over the inference `Engine` (standard library only).

Endpoints: `POST /v1/chat/completions` (messages, tools, tool_choice, n, temperature, top_p,
top_k, max_tokens / max_completion_tokens, stop, seed, logprobs, top_logprobs, stream),
`POST /v1/completions` (prompt as text or token ids: token-level rollouts through HTTP),
`GET /v1/models`, `GET /health` (queue, rows, prefix-cache hit rate, latency percentiles).

Every request goes to the engine (`katjax.rollout.engine`): a request arriving while others
generate joins their batch at the next decode chunk. The queue is bounded: beyond
`max_queue` waiting requests the answer is 503. A client that disconnects mid-generation
cancels its request: its rows are freed at the next chunk and a queued request is dropped.
`stream: true` answers with server-sent events: content deltas as chunks decode (text that
may still become a stop string or a `<tool_call>` block is held back), tool calls as
`tool_calls` deltas once parsed, the finish reason, optional usage, then `data: [DONE]`.
Tool calls are parsed from the model's `<tool_call>` blocks into OpenAI `tool_calls`;
`tool_choice` "none" leaves the text as is (generation itself is not constrained). Responses
also carry katjax fields: `token_ids`, `raw_logprobs`, `entropy` and `version` per choice
and `prompt_token_ids`. One log line per request (logger `katjax.rollout.server`).
"""

from __future__ import annotations

import http.server
import json
import logging
import select
import socket
import threading
import time
import urllib.parse
import uuid

from katjax.model.tokenizer import TOOL_CALL_OPEN
from katjax.rollout import protocol
from katjax.rollout.engine import Engine, Overloaded
from katjax.rollout.sampler import Sampler

__all__ = ["Engine", "Overloaded", "serve", "Server"]

log = logging.getLogger(__name__)


class Server:
  """A running server: `.url` (http://127.0.0.1:PORT), `.engine`, `.close()`."""

  def __init__(self, httpd, engine, thread):
    self.httpd, self.engine, self._thread = httpd, engine, thread
    host, port = httpd.server_address[:2]
    self.url = f"http://{host}:{port}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.engine.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def serve(backend: Sampler | Engine, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
          model_name: str = "katjax", max_batch: int = 16, max_queue: int = 64,
          max_n: int = 16, block: bool = False, recorder=None) -> Server:
  """Starts the HTTP server in a background thread (or blocks when `block`).

  backend: an `Engine` (shared with in-process callers), or a `Sampler` that gets its own
  engine of `max_batch` rows. recorder(session, request, completions), e.g. a
  `katjax.flow.TrajectoryManager`, is called after every answered call; the session is the
  URL prefix `/sessions/<id>` (`/sessions/<id>/v1/chat/completions`; "" without it).
  """
  engine = backend if hasattr(backend, "submit") else Engine(backend, rows=max_batch,
                                                             max_queue=max_queue)
  ctx = protocol.Context(tokenizer=tokenizer, model_name=model_name,
                         max_n=min(max_n, engine.rows), max_len=engine.sampler.max_len)

  class Handler(_Handler):
    pass

  Handler.engine, Handler.ctx = engine, ctx
  # staticmethod: a plain function stored on the class would be bound to the handler.
  Handler.recorder = None if recorder is None else staticmethod(recorder)
  httpd = http.server.ThreadingHTTPServer((host, port), Handler)
  httpd.daemon_threads = True
  if block:
    try:
      httpd.serve_forever()
    finally:
      engine.close()
  thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05),
                            name="katjax-http", daemon=True)
  thread.start()
  return Server(httpd, engine, thread)


class _Handler(http.server.BaseHTTPRequestHandler):
  engine: Engine
  ctx: protocol.Context
  recorder = None
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):  # the per-request line is written by _log_request
    pass

  def do_GET(self):
    path = self.path.split("?")[0].rstrip("/")
    if path == "/v1/models":
      self._send(200, protocol.models_response(self.ctx))
    elif path in ("/health", "/v1/health"):
      self._send(200, {"status": "ok", **self.engine.snapshot()})
    else:
      self._send(404, protocol.error(f"no route GET {path}", "not_found"))

  def do_POST(self):
    path = self.path.split("?")[0].rstrip("/")
    session = ""
    if path.startswith("/sessions/"):
      session, _, rest = path[len("/sessions/"):].partition("/")
      session = urllib.parse.unquote(session)  # ids with "/" or "#" come percent-encoded
      path = "/" + rest
    self._session = session
    try:
      length = int(self.headers.get("Content-Length") or 0)
      body = json.loads(self.rfile.read(length) or b"{}")
    except (ValueError, json.JSONDecodeError) as e:
      return self._send(400, protocol.error(f"request body is not valid JSON: {e}"))
    try:
      if path == "/v1/chat/completions":
        req = protocol.parse_chat(body, self.ctx)
      elif path == "/v1/completions":
        req = protocol.parse_completion(body, self.ctx)
      else:
        return self._send(404, protocol.error(f"no route POST {path}", "not_found"))
    except ValueError as e:
      err = protocol.error(str(e), code=getattr(e, "code", None), param=getattr(e, "param", None))
      log.info("POST %s 400 %s", path, e)
      return self._send(400, err)
    try:
      job = self.engine.submit(req.prompt_ids, req.sampling, n=req.n, seed=req.seed,
                               top_logprobs=req.top_logprobs)
    except Overloaded as e:
      return self._send(503, protocol.error(str(e), "overloaded"))
    except ValueError as e:
      return self._send(400, protocol.error(str(e)))
    status = self._stream(req, job) if req.stream else self._answer(req, job)
    self._log_request(path, req, job, status)

  def _answer(self, req, job):
    while not job.event.wait(0.05):
      if self._client_gone():
        self.engine.cancel(job)
        return "disconnected"
    if job.error is not None:
      self._send(500, protocol.error(f"generation failed: {job.error}", "server_error"))
      return 500
    self._record(req, job)
    self._send(200, protocol.render_response(req, job.result, self.ctx))
    return 200

  def _stream(self, req, job):
    """Server-sent events: chat.completion.chunk (or text_completion) objects, then [DONE]."""
    chat = req.kind == "chat"
    head = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                object="chat.completion.chunk" if chat else "text_completion",
                created=int(time.time()), model=req.model or self.ctx.model_name)
    try:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")
      self.end_headers()
      self.close_connection = True
      event = lambda choices, **kw: self._event(dict(head, choices=choices, **kw))
      if chat:
        event([{"index": j, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None} for j in range(req.n)])
      sent = [""] * req.n
      holds = _holds(req, self.ctx.tokenizer)
      while not job.done:
        with job.updated:
          job.updated.wait(0.05)
        if self._client_gone():
          self.engine.cancel(job)
          return "disconnected"
        for j in range(req.n):
          text = _visible(self.ctx.tokenizer.decode(job.tokens(j)), holds)
          if len(text) > len(sent[j]) and text.startswith(sent[j]):
            event([_delta(chat, j, text[len(sent[j]):])])
            sent[j] = text
      if job.error is not None:
        self._event(protocol.error(f"generation failed: {job.error}", "server_error"))
        return 500
      final = protocol.render_response(req, job.result, self.ctx)
      for j, choice in enumerate(final["choices"]):
        text = choice["message"]["content"] or "" if chat else choice["text"]
        if text.startswith(sent[j]) and len(text) > len(sent[j]):
          event([_delta(chat, j, text[len(sent[j]):])])
        last = _delta(chat, j, "", choice["finish_reason"])
        if chat and choice["message"].get("tool_calls"):
          last["delta"]["tool_calls"] = [dict(call, index=k) for k, call in enumerate(
              choice["message"]["tool_calls"])]
        last["token_ids"], last["version"] = choice["token_ids"], choice["version"]
        event([last])
      self._record(req, job)
      if req.include_usage:
        event([], usage=final["usage"])
      self.wfile.write(b"data: [DONE]\n\n")
      self.wfile.flush()
      return 200
    except (BrokenPipeError, ConnectionResetError):
      self.engine.cancel(job)
      return "disconnected"

  def _record(self, req, job):
    """Hands the call to the recorder before the client sees the answer."""
    if self.recorder is not None:
      self.recorder(self._session, req, job.result)

  def _event(self, payload):
    self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
    self.wfile.flush()

  def _log_request(self, path, req, job, status):
    gen = sum(len(c.tokens) for c in job.result or [])
    wait = (job.started or job.finished or time.monotonic()) - job.submitted
    latency = (job.finished or time.monotonic()) - job.submitted
    log.info("POST %s %s model=%s n=%d stream=%s prompt_tokens=%d prefix_hit=%d "
             "generated_tokens=%d queue_wait=%.3fs latency=%.3fs", path, status,
             req.model or self.ctx.model_name, req.n, req.stream, len(req.prompt_ids),
             job.prefix_hit, gen, wait, latency)

  def _client_gone(self) -> bool:
    """True when the peer closed its socket (readable with nothing left to read)."""
    try:
      readable, _, _ = select.select([self.connection], [], [], 0)
      return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
      return True

  def _send(self, code, payload):
    data = json.dumps(payload).encode()
    try:
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass


def _holds(req, tok) -> list[str]:
  """Markers whose start must not be streamed yet: stop strings, stop tokens, tool calls."""
  stops = req.sampling.stop_ids if req.sampling.stop_ids is not None else tok.stop_ids
  marks = list(req.sampling.stop) + [tok.decode([i]) for i in stops]
  if req.tools and req.tool_choice != "none":
    marks.append(TOOL_CALL_OPEN)
  return [m for m in marks if m]


def _visible(text, holds) -> str:
  """text up to the first marker, minus a tail that could still become one (or a split char)."""
  for m in holds:
    cut = text.find(m)
    if cut >= 0:
      text = text[:cut]
  keep = len(text)
  for m in holds:
    for k in range(min(len(m) - 1, len(text)), 0, -1):
      if text.endswith(m[:k]):
        keep = min(keep, len(text) - k)
        break
  text = text[:keep]
  return text.rstrip("\ufffd")


def _delta(chat, j, text, finish=None):
  if chat:
    return {"index": j, "delta": {"content": text} if text else {}, "finish_reason": finish}
  return {"index": j, "text": text, "finish_reason": finish, "logprobs": None}
