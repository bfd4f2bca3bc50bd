"""OpenAI-compatible HTTP server over the `Sampler` (standard library only).

Endpoints: `POST /v1/chat/completions` (messages, tools, tool_choice, n, temperature, top_p,
top_k, max_tokens / max_completion_tokens, stop, seed, logprobs), `POST /v1/completions`
(prompt as text or token ids: token-level rollouts through HTTP), `GET /v1/models`,
`GET /health` (queue statistics).

Concurrent requests are batched: one engine thread takes the queue head plus whatever else
arrived within `batch_wait` seconds (same `n`, up to `max_batch` rows) and runs them as one
sampler batch. The queue is bounded: beyond `max_queue` waiting requests the answer is 503.
A client that disconnects mid-generation cancels its request: its rows stop at the next
decode chunk and a queued request is dropped. Tool calls are parsed from the model's
`<tool_call>` blocks into OpenAI `tool_calls`; `tool_choice` "none" leaves the text as is
(generation itself is not constrained). Responses also carry katjax fields: `token_ids`,
`raw_logprobs` and `entropies` per choice and `prompt_token_ids`.
"""

from __future__ import annotations

import collections
import http.server
import json
import select
import socket
import threading
import time
import uuid

import jax
import numpy as np

from katjax.rollout import protocol
from katjax.rollout.sampler import Sampler

__all__ = ["Engine", "Overloaded", "serve", "Server"]


class Overloaded(Exception):
  """The request queue is full (HTTP 503)."""


class _Job:
  def __init__(self, prompt, params, n, seed):
    self.prompt, self.params, self.n, self.seed = prompt, params, n, seed
    self.event, self.result, self.error, self.cancelled = threading.Event(), None, None, False


class Engine:
  """Batches concurrent requests onto one Sampler; a single worker thread owns the sampler."""

  def __init__(self, sampler: Sampler, *, max_batch: int = 16, max_queue: int = 64,
               batch_wait: float = 0.005):
    self.sampler, self.max_batch, self.max_queue = sampler, max_batch, max_queue
    self.batch_wait = batch_wait
    self._queue: collections.deque[_Job] = collections.deque()
    self._cv = threading.Condition()
    self._running: list[_Job] = []
    self.stats = collections.Counter()
    self._stop, self._pending_params = False, None
    self._thread = threading.Thread(target=self._loop, name="katjax-engine", daemon=True)
    self._thread.start()

  def submit(self, prompt, params, n=1, seed=0) -> _Job:
    """Queues a request; raises Overloaded when `max_queue` requests already wait."""
    job = _Job(np.asarray(prompt, np.int32), params, n, seed)
    with self._cv:
      if len(self._queue) >= self.max_queue:
        self.stats["rejected"] += 1
        raise Overloaded(f"server overloaded: {len(self._queue)} requests already queued "
                         f"(max_queue={self.max_queue}); retry later")
      self._queue.append(job)
      self._cv.notify()
    return job

  def cancel(self, job: _Job) -> None:
    """Drops a queued job, or stops a running one at the next decode chunk."""
    with self._cv:
      job.cancelled = True
      self.stats["cancelled"] += 1
      if job in self._queue:
        self._queue.remove(job)
        job.event.set()

  def update_weights(self, params) -> None:
    """New weights for the next batch (a running batch finishes on the old ones)."""
    with self._cv:
      self._pending_params = params

  def snapshot(self) -> dict:
    with self._cv:
      running = [j for j in self._running if not j.cancelled]
      return dict(queued=len(self._queue), running=len(running),
                  running_rows=sum(j.n for j in running), **self.stats)

  def close(self):
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout=5)

  def _loop(self):
    while True:
      with self._cv:
        while not self._queue and not self._stop:
          self._cv.wait()
        if self._stop:
          return
      time.sleep(self.batch_wait)  # let concurrent requests join this batch
      with self._cv:
        batch = [self._queue.popleft()]
        rows = batch[0].n
        for job in list(self._queue):
          if job.n == batch[0].n and rows + job.n <= self.max_batch:
            self._queue.remove(job)
            batch.append(job)
            rows += job.n
        self._running = batch
        params, self._pending_params = self._pending_params, None
      if params is not None:
        self.sampler.update_weights(params)
      self._run(batch)
      with self._cv:
        self._running = []

  def _run(self, batch):
    n = batch[0].n
    keys = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(
        jax.random.key(job.seed), j))) for job in batch for j in range(n)])
    try:
      out = self.sampler.generate([j.prompt for j in batch], [j.params for j in batch], n=n,
                                  keys=keys, cancelled=lambda i: batch[i].cancelled)
      self.stats["batches"] += 1
      self.stats["requests"] += len(batch)
      for job, comps in zip(batch, out):
        job.result = comps
    except Exception as e:  # noqa: BLE001 - reported to every waiting client as a 500
      for job in batch:
        job.error = e
    for job in batch:
      job.event.set()


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


def serve(sampler: Sampler, tokenizer, *, host: str = "127.0.0.1", port: int = 0,
          model_name: str = "katjax", max_batch: int = 16, max_queue: int = 64,
          max_n: int = 16, batch_wait: float = 0.005, block: bool = False) -> Server:
  """Starts the HTTP server in a background thread (or blocks when `block`)."""
  engine = Engine(sampler, max_batch=max_batch, max_queue=max_queue, batch_wait=batch_wait)
  ctx = protocol.Context(tokenizer=tokenizer, model_name=model_name, max_n=min(max_n, max_batch),
                         max_len=sampler.max_len)

  class Handler(_Handler):
    pass

  Handler.engine, Handler.ctx = engine, ctx
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
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):  # quiet: one line per request is too much for rollouts
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
      return self._send(400, protocol.error(str(e)))
    try:
      job = self.engine.submit(req.prompt_ids, req.params, req.n, req.seed)
    except Overloaded as e:
      return self._send(503, protocol.error(str(e), "overloaded"))
    while not job.event.wait(0.05):
      if self._client_gone():
        self.engine.cancel(job)
        return
    if job.error is not None:
      return self._send(500, protocol.error(f"generation failed: {job.error}", "server_error"))
    if job.cancelled:
      return
    self._send(200, protocol.render_response(req, job.result, self.ctx))

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
