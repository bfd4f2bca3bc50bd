"""Inference engine: continuous batching, prefix caching across turns, versioned weights.

A static batch (`Sampler.generate`) makes a request that arrives while it runs wait for the
whole batch, and re-prefills a multi-turn agent's full history every turn. The engine keeps
one pool of `rows` KV-cache rows that a single worker thread owns, and between decode chunks:

- applies pending weights (`update_weights`): never inside a chunk; the version counter goes
  up by one and every token carries the version of the weights that produced it. Running
  rows continue on their cache (keys and values of earlier tokens stay those of the old
  weights, as in partial rollouts); cached prefixes of the old weights are never reused;
- frees the rows of finished and cancelled requests at once;
- admits queued requests into free rows (continuous batching). A request's prompt is matched
  against the tokens every row holds in its cache (running rows, and finished rows that keep
  their last conversation until evicted, least recently used first); the longest common
  prefix is copied (or kept in place) and only the rest is prefilled (prefix caching: a
  conversation's earlier turns, or a system prompt shared by many agents);
- runs one decode chunk over all rows (idle rows are masked done).

Rows sample exactly as in `Sampler.generate`: token t of a row uses `fold_in(row_key, t)`
with the same default keys, and the cache is read under the same causal rule, so the engine
gives the plain sampler's tokens (test). Callers: `submit` (handle with streaming updates),
`generate` (the `Sampler.generate` signature, so the agent loop takes an engine as backend),
and the HTTP server.
"""

from __future__ import annotations

import collections
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from katjax.model import api as model_api
from katjax.rollout.sampler import (_CPU_COMPILER_OPTIONS, Completion, Sampler, SamplingParams,
                                    _key_data, _sampling_arrays, bucket, top_logprobs)
from katjax.rollout.sampling import finished as _finished
from katjax.rollout.sampling import sample as _sample

__all__ = ["Engine", "EngineRequest", "Overloaded", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20  # OpenAI's bound; one compiled width for every request that asks


class Overloaded(Exception):
  """The request queue is full (HTTP 503)."""


class EngineRequest:
  """One submitted prompt with n forks. Read `.event`, `.result` / `.error` when done.

  While it runs, `tokens(j)` is fork j's tokens so far and `.updated` (a Condition) is
  notified after every chunk (streaming).
  """

  def __init__(self, prompt, sampling, n, keys, top):
    self.prompt, self.sampling, self.n, self.keys, self.top = prompt, sampling, n, keys, top
    self.event, self.updated = threading.Event(), threading.Condition()
    self.result, self.error, self.cancelled = None, None, False
    self.submitted, self.started, self.finished = time.monotonic(), None, None
    self.prefix_hit = 0
    self._out = [collections.defaultdict(list) for _ in range(n)]
    self._reason, self._keep, self._text = [None] * n, [None] * n, [None] * n

  def tokens(self, j: int) -> list[int]:
    return list(self._out[j]["tokens"])

  @property
  def done(self) -> bool:
    return self.event.is_set()


class Engine:
  """Continuous-batching engine over one `Sampler` (its weights, settings and programs)."""

  def __init__(self, sampler: Sampler, *, rows: int = 16, max_queue: int = 64,
               prefix_cache: bool = True, min_cache: int = 0):
    if rows < 1:
      raise ValueError(f"Engine: rows must be >= 1, got {rows}")
    self.sampler, self.rows, self.max_queue = sampler, bucket(rows, 1), max_queue
    # The cache starts at max(min_cache, what the first request needs) and doubles when a
    # chunk needs more (decode attention reads every slot: a cache twice the live length
    # doubles its cost); a fixed min_cache = max_len compiles one shape (tests).
    self.prefix_cache, self.min_cache = prefix_cache, min_cache
    self._admit_fn = _admit_program(sampler.cfg)
    self._queue: collections.deque[EngineRequest] = collections.deque()
    self._cv = threading.Condition()
    self._pending, self._stop = None, False
    self._state, self._cache_len, self._width = None, 0, 8
    self._row = [None] * self.rows  # (request, fork) per busy row
    self._taken = {}  # id -> request: out of the queue and not complete (rows or admitting)
    self._held = [np.zeros(0, np.int32)] * self.rows  # tokens whose K/V the row holds
    self._used = np.zeros(self.rows, np.int64)  # last use tick (LRU eviction)
    self._tick = 0
    self.stats = collections.Counter()
    self._latency = collections.deque(maxlen=1000)
    self._wait = collections.deque(maxlen=1000)
    self._thread = threading.Thread(target=self._loop, name="katjax-engine", daemon=True)
    self._thread.start()

  # --- public -------------------------------------------------------------------------------

  @property
  def version(self) -> int:
    """The policy version of the weights in use (+1 per applied `update_weights`)."""
    return self.sampler.version

  def submit(self, prompt, sampling: SamplingParams | None = None, *, n: int = 1,
             seed: int = 0, keys=None, top_logprobs: int = 0) -> EngineRequest:
    """Queues one prompt (n forks); raises Overloaded when `max_queue` requests wait."""
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
      raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    prompt = self.sampler._fit(0, self.sampler._check_prompt(0, prompt), sampling)
    if not isinstance(n, int) or not 1 <= n <= self.rows:
      raise ValueError(f"n must be an int in [1, {self.rows}] (the engine's rows), got {n!r}")
    if sampling.stop and self.sampler.tokenizer is None:
      raise ValueError("stop strings need a Sampler with a tokenizer")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
      raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    if keys is None:
      keys = [jax.random.fold_in(jax.random.PRNGKey(seed), j) for j in range(n)]
    keys = _key_data(keys)
    if keys.shape != (n, 2):
      raise ValueError(f"keys must have shape ({n}, 2), got {keys.shape}")
    req = EngineRequest(prompt, sampling, n, keys, top_logprobs)
    with self._cv:
      if len(self._queue) >= self.max_queue:
        self.stats["rejected"] += 1
        raise Overloaded(f"server overloaded: {len(self._queue)} requests already queued "
                         f"(max_queue={self.max_queue}); retry later")
      self._queue.append(req)
      self._cv.notify_all()
    return req

  def generate(self, prompts, sampling=None, *, n: int = 1, seed: int = 0, keys=None,
               cancelled=None) -> list[list[Completion]]:
    """`Sampler.generate`'s contract (same default keys, so the same tokens), run in the engine."""
    plist = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    if len(plist) != len(prompts):
      raise ValueError(f"sampling must be one SamplingParams or a list of {len(prompts)}")
    if keys is not None:
      keys = _key_data(keys).reshape(len(prompts), n, 2)
    reqs = [self.submit(p, sp, n=n, seed=seed + i, keys=None if keys is None else keys[i])
            for i, (p, sp) in enumerate(zip(prompts, plist))]
    for i, req in enumerate(reqs):
      while not req.event.wait(0.02):
        if cancelled is not None and not req.cancelled and cancelled(i):
          self.cancel(req)
      if req.error is not None:
        raise RuntimeError(f"generation failed: {req.error}") from req.error
    return [req.result for req in reqs]

  def cancel(self, req: EngineRequest) -> None:
    """Drops a queued request, or frees its rows at the next chunk boundary."""
    with self._cv:
      if req.done or req.cancelled:
        return
      req.cancelled = True
      self.stats["cancelled"] += 1
      if req in self._queue:
        self._queue.remove(req)
        req._reason = ["cancelled"] * req.n
        self._finish(req)
      self._cv.notify_all()

  def update_weights(self, params) -> None:
    """New weights from the next chunk boundary on (a running chunk finishes on the old)."""
    with self._cv:
      self._pending = params
      self._cv.notify_all()

  def snapshot(self) -> dict:
    """Queue, rows, prefix-cache hit rate, latency percentiles (seconds)."""
    with self._cv:
      busy = [r for r in self._row if r is not None and not r[0].cancelled]
      out = dict.fromkeys(("requests", "admitted", "cancelled", "rejected", "chunks",
                           "row_chunks", "shared_chunks", "max_requests_per_chunk",
                           "prompt_tokens", "prefix_hit_tokens", "generated_tokens"), 0)
      out.update(self.stats, queued=len(self._queue), running=len({id(r[0]) for r in busy}),
                 running_rows=len(busy), rows=self.rows, version=self.version)
      prompt = self.stats["prompt_tokens"]
      out["prefix_hit_rate"] = self.stats["prefix_hit_tokens"] / prompt if prompt else 0.0
      for name, xs in (("latency", self._latency), ("queue_wait", self._wait)):
        if xs:
          p = np.percentile(np.asarray(xs), [50, 90, 99])
          out.update({f"{name}_p50": float(p[0]), f"{name}_p90": float(p[1]),
                      f"{name}_p99": float(p[2])})
      return out

  def close(self):
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout=10)

  # --- worker -------------------------------------------------------------------------------

  def _loop(self):
    while True:
      with self._cv:
        while not (self._stop or self._queue or self._pending is not None or any(self._row)):
          self._cv.wait()
        if self._stop:
          self._fail_all(RuntimeError("engine closed"))
          return
        params, self._pending = self._pending, None
        self._free_cancelled()
        admits = self._take_admissions()
      waiting = collections.deque(admits)  # taken from the queue, not yet in rows
      admitting = False  # while true, waiting[0] is the request being prefilled
      try:
        if params is not None:
          self.sampler.update_weights(params)
          self._held = [np.zeros(0, np.int32)] * self.rows  # old weights' K/V: no reuse
        while waiting:
          admitting = True
          self._admit(waiting[0])
          waiting.popleft()
          admitting = False
        if any(self._row):
          self._step()
      except Exception as e:  # noqa: BLE001 - every affected caller gets it (HTTP 500)
        with self._cv:
          # Requests after the one being admitted were not touched: back to the front of
          # the queue. Every other request taken from it fails (those in rows, the one
          # being admitted, one whose rows this chunk freed): none is ever dropped, which
          # would leave its caller waiting forever.
          if admitting and waiting:
            waiting.popleft()  # it fails below with the rest of `_taken`
          for req in waiting:
            self._taken.pop(id(req), None)
          self._queue.extendleft(reversed(waiting))
          self._fail_all(e, queued=False)
        self._state = None

  def _take_admissions(self):
    """Queued requests that fit in the free rows, in arrival order (caller holds _cv)."""
    free = sum(r is None for r in self._row)
    out = []
    while self._queue and self._queue[0].n <= free:
      req = self._queue.popleft()
      free -= req.n
      out.append(req)
      self._taken[id(req)] = req
    return out

  def _admit(self, req):
    """Prefills one request (its n forks share the prefill) into free rows."""
    sp_default = self.sampler.stop_ids
    stops = len(req.sampling.stop_ids) if req.sampling.stop_ids is not None else 0
    self._ensure_state(len(req.prompt), bucket(max(stops, len(sp_default)), 8))
    b = self.rows
    free = [r for r in range(b) if self._row[r] is None]
    src, hit = self._match(req.prompt)
    by_value = sorted(free, key=lambda r: (len(self._held[r]) > 0, self._used[r]))
    first = src if src in free else by_value[0]  # a free source row is extended in place
    rows = [first] + [r for r in by_value if r != first][:req.n - 1]
    rest = req.prompt[hit:]
    tokens = np.zeros((1, bucket(len(rest))), np.int32)
    tokens[0, :len(rest)] = rest
    dst, keys = np.full(b, b, np.int32), np.zeros((b, 2), np.uint32)
    row_sp = [SamplingParams()] * b
    for j, r in enumerate(rows):
      dst[r], row_sp[r], keys[r] = r, req.sampling, req.keys[j]
      self._row[r], self._held[r] = (req, j), req.prompt
    req.started, req.prefix_hit = time.monotonic(), hit
    self.stats["prompt_tokens"] += len(req.prompt)
    self.stats["prefix_hit_tokens"] += hit
    self._wait.append(req.started - req.submitted)
    samp = _sampling_arrays(row_sp, b, sp_default, self.sampler.emit_vocab)
    width = samp["stop_ids"].shape[1]
    samp["stop_ids"] = jnp.pad(samp["stop_ids"], ((0, 0), (0, self._width - width)),
                               constant_values=-1)
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    self._state, first = self._admit_fn(
        self.sampler.params, self._state, jnp.asarray(tokens), i32([hit]),
        i32([len(req.prompt)]), i32([src if src is not None else first]), jnp.asarray(dst),
        jnp.zeros(b, jnp.int32), samp, jnp.asarray(keys), top=self._top())
    first = jax.device_get(first)
    first["valid"] = dst < b
    self._collect({k: v[:, None] for k, v in first.items()})
    self.stats["admitted"] += 1

  def _step(self):
    """One decode chunk over the pool; then frees finished rows."""
    b, chunk = self.rows, self.sampler.chunk
    need = 0
    for r in range(b):
      if self._row[r] is not None:
        req, j = self._row[r]
        idx = len(req.prompt) + len(req._out[j]["tokens"]) - 1
        need = max(need, min(idx + chunk, len(req.prompt) + req.sampling.max_new_tokens))
    self._ensure_state(need, self._width)
    reqs = {id(r[0]) for r in self._row if r is not None}
    self.stats["chunks"] += 1
    self.stats["row_chunks"] += sum(r is not None for r in self._row)
    self.stats["max_requests_per_chunk"] = max(self.stats["max_requests_per_chunk"], len(reqs))
    if len(reqs) > 1:
      self.stats["shared_chunks"] += 1
    self._state, out = self.sampler._decode(self.sampler.params, self._state, steps=chunk,
                                            top=self._top())
    self._collect(jax.device_get(out))

  def _collect(self, out):
    """Appends a chunk's valid tokens to their requests; frees rows that finished."""
    version = self.version
    dev_done = np.asarray(jax.device_get(self._state["done"]))
    host_done = np.zeros(self.rows, bool)
    touched = set()
    for r in range(self.rows):
      if self._row[r] is None:
        continue
      req, j = self._row[r]
      valid = out["valid"][r]
      rec = req._out[j]
      for key in ("tokens", "logp", "raw", "ent"):
        rec[key].extend(out[key][r][valid].tolist())
      rec["version"].extend([version] * int(valid.sum()))
      if "top_ids" in out:
        rec["top"].extend(zip(out["top_ids"][r][valid].tolist(), out["top_lp"][r][valid].tolist()))
      toks = rec["tokens"]
      if rec["version"][0] == version:  # its cache is all of this version's weights
        self._held[r] = np.concatenate([req.prompt, np.asarray(toks[:-1], np.int32)])
      touched.add(req)
      stop = self._stop_string(req, j)
      if stop is not None:
        req._reason[j], req._keep[j], req._text[j] = "stop", stop[0], stop[1]
      elif req.cancelled:
        req._reason[j] = "cancelled"
      if dev_done[r] or req._reason[j] is not None:
        host_done[r] = True
        self._row[r] = None
        self._tick += 1
        self._used[r] = self._tick
    if host_done.any():
      self._state["done"] = self._state["done"] | jnp.asarray(host_done)
    for req in touched:
      if not any(row is not None and row[0] is req for row in self._row):
        self._finish_or_fail(req)
      with req.updated:
        req.updated.notify_all()

  # --- helpers ------------------------------------------------------------------------------

  def _match(self, prompt):
    """(row, hit): the row whose held tokens share the longest prefix with `prompt`."""
    if not self.prefix_cache:
      return None, 0
    best, hit = None, 0
    for r in range(self.rows):
      held = self._held[r]
      m = min(len(held), len(prompt) - 1)  # at least one token is prefilled (its logits)
      if m <= hit:
        continue
      neq = np.nonzero(held[:m] != prompt[:m])[0]
      k = int(neq[0]) if len(neq) else m
      if k > hit:
        best, hit = r, k
    return best, hit

  def _stop_string(self, req, j):
    tok, sp = self.sampler.tokenizer, req.sampling
    if tok is None or not sp.stop:
      return None
    toks = req._out[j]["tokens"]
    text = tok.decode(toks)
    hits = [text.find(s) for s in sp.stop if s in text]
    if not hits:
      return None
    keep = next(k for k in range(1, len(toks) + 1)
                if any(s in tok.decode(toks[:k]) for s in sp.stop))
    return keep, text[:min(hits)]

  def _finish(self, req):
    comps = []
    stops_default = self.sampler.stop_ids
    for j in range(req.n):
      rec, reason = req._out[j], req._reason[j]
      cnt = len(rec["tokens"]) if req._keep[j] is None else min(req._keep[j], len(rec["tokens"]))
      toks = np.asarray(rec["tokens"][:cnt], np.int32)
      if reason is None:
        stops = req.sampling.stop_ids if req.sampling.stop_ids is not None else stops_default
        reason = "stop" if cnt and int(toks[-1]) in stops else "length"
      comp = Completion(tokens=toks, logprobs=np.asarray(rec["logp"][:cnt], np.float32),
                        raw_logprobs=np.asarray(rec["raw"][:cnt], np.float32),
                        entropy=np.asarray(rec["ent"][:cnt], np.float32), finish_reason=reason,
                        prompt_len=len(req.prompt),
                        version=np.asarray(rec["version"][:cnt], np.int32),
                        top_logprobs=rec["top"][:cnt] if req.top else None)
      if self.sampler.tokenizer is not None:
        comp.text = req._text[j] if req._text[j] is not None else self.sampler.tokenizer.decode(
            comp.tokens)
      comps.append(comp)
    req.result = comps
    with self._cv:
      self.stats["requests"] += 1
      self.stats["generated_tokens"] += sum(len(c.tokens) for c in comps)
      self._complete(req)

  def _finish_or_fail(self, req):
    """_finish, or the request completes with the error (e.g. its tokens do not decode):
    its rows are already free, so nothing else would ever complete it."""
    try:
      self._finish(req)
    except Exception as e:  # noqa: BLE001 - this caller gets it; the other requests go on
      with self._cv:
        self._fail_request(req, e)

  def _fail_request(self, req, err):
    if not req.done:
      req.error = err
      self._complete(req)

  def _complete(self, req):
    self._taken.pop(id(req), None)
    req.finished = time.monotonic()
    self._latency.append(req.finished - req.submitted)
    req.event.set()
    with req.updated:
      req.updated.notify_all()

  def _top(self):
    return MAX_TOP_LOGPROBS if any(r is not None and r[0].top for r in self._row) else 0

  def _free_cancelled(self):
    """Rows of cancelled requests stop now (caller holds _cv); their requests complete."""
    gone = np.zeros(self.rows, bool)
    reqs = {}
    for r, row in enumerate(self._row):
      if row is not None and row[0].cancelled:
        gone[r], self._row[r] = True, None
        reqs[id(row[0])] = row[0]
    for req in reqs.values():
      if not req.done:
        req._reason = [x or "cancelled" for x in req._reason]
        self._finish_or_fail(req)
    if gone.any() and self._state is not None:
      self._state["done"] = self._state["done"] | jnp.asarray(gone)

  def _fail_all(self, err, queued=True):
    reqs = {id(r[0]): r[0] for r in self._row if r is not None}
    reqs.update(self._taken)
    if queued:
      reqs.update({id(r): r for r in self._queue})
      self._queue.clear()
    for req in reqs.values():
      self._fail_request(req, err)
    self._row = [None] * self.rows
    self._held = [np.zeros(0, np.int32)] * self.rows

  def _ensure_state(self, need_len, width):
    """Creates the pool state, or grows its cache / stop-id width to fit."""
    size = min(bucket(max(need_len, self.min_cache, 1)), self.sampler.max_len)
    if self._state is None:
      b = self.rows
      cfg = self.sampler.cfg
      self._cache_len, self._width = size, width
      samp = _sampling_arrays([], b, (), self.sampler.emit_vocab)
      samp["stop_ids"] = jnp.full((b, width), -1, jnp.int32)
      self._state = dict(cache=model_api.init_cache(cfg, b, size, self.sampler.cache_dtype),
                         last=jnp.zeros(b, jnp.int32), index=jnp.zeros(b, jnp.int32),
                         count=jnp.zeros(b, jnp.int32), done=jnp.ones(b, bool),
                         keys=jnp.zeros((b, 2), jnp.uint32), samp=samp)
      self._held = [np.zeros(0, np.int32)] * b
      return
    if size > self._cache_len:
      self._state["cache"] = self.sampler._grow(self._state["cache"], size=size)
      self._cache_len = size
    if width > self._width:
      pad = width - self._width
      self._state["samp"] = dict(self._state["samp"], stop_ids=jnp.pad(
          self._state["samp"]["stop_ids"], ((0, 0), (0, pad)), constant_values=-1))
      self._width = width


@functools.lru_cache(maxsize=8)
def _admit_program(cfg):
  """One compiled admission per model config (engines over the same model share it)."""
  opts = _CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(functools.partial(_admit, cfg), static_argnames=("top",), donate_argnums=(1,),
                 compiler_options=opts)


def _admit(cfg, params, state, tokens, hits, lens, copy_src, dst, rsrc, samp, keys, *, top):
  """Prefills new prompts into pool rows; samples their first tokens.

  tokens int[U, Tp]: prompt i's tokens after its cached prefix of hits[i] slots, which come
  from row copy_src[i]; lens[i] its full length. dst int[B]: for each pool row, itself if it
  receives prompt rsrc[b] (n forks of one prompt share its prefill), else B (untouched).
  The gather happens before the scatter, so a source row may also be a destination.
  """
  b, tp = dst.shape[0], tokens.shape[1]
  sub = jax.tree.map(lambda c: c[copy_src], state["cache"])
  positions = hits[:, None] + jnp.arange(tp, dtype=jnp.int32)
  # Slots past a prompt's end get padding K/V (or are dropped past the cache's end): they are
  # overwritten before any query sees them, as in the sampler's prefill.
  logits, sub = model_api.forward_with_cache(cfg, params, tokens, positions, sub, hits,
                                             logits_index=lens - hits - 1)
  cache = jax.tree.map(lambda c, s: c.at[dst].set(s[rsrc], mode="drop"), state["cache"], sub)
  last = logits[:, 0][rsrc]
  zero = jnp.zeros(b, jnp.int32)
  tok, logp, raw, ent = _sample(last, keys, zero, samp)
  done = _finished(tok, zero + 1, samp)
  put = lambda a, x: a.at[dst].set(x, mode="drop")
  new = dict(cache=cache, last=put(state["last"], tok), index=put(state["index"], lens[rsrc]),
             count=put(state["count"], zero + 1), done=put(state["done"], done),
             keys=put(state["keys"], keys),
             samp={k: put(state["samp"][k], samp[k]) for k in state["samp"]})
  first = dict(tokens=tok, logp=logp, raw=raw, ent=ent)
  if top:
    first["top_lp"], first["top_ids"] = top_logprobs(last, top)
  return new, first
