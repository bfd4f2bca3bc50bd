"""JAX sampler: jitted prefill + chunked decode over a preallocated KV cache.

`Sampler.generate(prompts, sampling, n=...)` runs a batch of token-id prompts; `n > 1` forks
each prompt into n continuations that share its prefilled cache (the rows are copied, the
prefix is computed once): tree rollouts. For every generated token it records the id, the
logprob under the sampling distribution (temperature / top-k / top-p applied; 0 for greedy),
the logprob under the raw model, the full-vocabulary entropy of the raw model and the
policy version (`update_weights` count) of the weights that produced it.

Shapes are static and bucketed (batch, prompt length and cache length round up to powers of
two), so a long-running sampler compiles a handful of programs. Sampling settings are
per-row arrays, so requests with different settings share one batch without recompiling;
`params` (the weights) are an argument of every jitted function, so `update_weights` never
recompiles.
Randomness is per row: token t of a row uses `fold_in(row_key, t)`, so a row's output does
not depend on what else is in the batch (a fork equals an independent run with its key).

Decoding runs in chunks of `chunk` steps; between chunks the host checks stop strings and
cancellations (a disconnected client frees its row at the next chunk boundary).

This is the static-batch sampler: one call, one batch. `katjax.rollout.engine.Engine` runs
requests continuously on top of it (rows join and leave between chunks, prefix caching).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from katjax.model import api as model_api
from katjax.model.config import ModelConfig
from katjax.rollout.sampling import filter_logits
from katjax.rollout.sampling import finished as _finished
from katjax.rollout.sampling import sample as _sample

__all__ = ["SamplingParams", "Completion", "Sampler", "bucket", "filter_logits"]

# XLA CPU hands dots to YNNPACK by default; for decode-shaped matmuls (a batch of rows
# against every weight matrix) Eigen's dot measured faster per decode step (figures in
# docs/benchmarks.md, "Sampler"), so the sampler's programs compile with it on CPU.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 64
  stop_ids: tuple[int, ...] | None = None  # None: the sampler's default (tokenizer stop ids)
  stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); excluded from `text`

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f"SamplingParams: {msg}")
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
      bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
    if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
      bad(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      bad(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if self.stop_ids is not None:
      ids = tuple(self.stop_ids)
      if not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        bad(f"stop_ids must be non-negative ints, got {self.stop_ids!r}")
      object.__setattr__(self, "stop_ids", tuple(int(i) for i in ids))
    if not all(isinstance(s, str) and s for s in self.stop) or len(self.stop) > 8:
      bad(f"stop must be at most 8 non-empty strings, got {self.stop!r}")
    object.__setattr__(self, "stop", tuple(self.stop))


@dataclasses.dataclass
class Completion:
  """One continuation: int32[N] tokens, version; float32[N] logprobs, raw_logprobs, entropy."""

  tokens: np.ndarray
  logprobs: np.ndarray  # under the sampling distribution (0 for greedy)
  raw_logprobs: np.ndarray  # under the raw model (temperature 1, no filtering)
  entropy: np.ndarray  # full-vocabulary entropy of the raw model's next-token distribution
  finish_reason: str  # "stop" | "length" | "cancelled"
  prompt_len: int
  text: str | None = None  # decoded (stop string removed) when the sampler has a tokenizer
  version: np.ndarray | None = None  # int32[N] policy version per token (None: all 0)
  top_logprobs: list | None = None  # per token [(id, raw logprob)] when requested

  def __post_init__(self):
    if self.version is None:
      self.version = np.zeros(len(self.tokens), np.int32)


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


class Sampler:
  """Batched sampler for one model config. Thread-compatible, not thread-safe: one caller."""

  def __init__(self, cfg: ModelConfig, params, *, max_len: int = 2048, tokenizer=None,
               stop_ids: Sequence[int] | None = None, mesh=None, max_batch: int = 64,
               chunk: int = 32, truncate_prompt: bool = False, cache_dtype=None):
    if max_len < 2:
      raise ValueError(f"Sampler: max_len must be >= 2, got {max_len}")
    self.cfg, self.max_len, self.tokenizer, self.mesh = cfg, int(max_len), tokenizer, mesh
    self.max_batch, self.chunk, self.truncate_prompt = int(max_batch), int(chunk), truncate_prompt
    if stop_ids is None:
      stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or ())
    self.stop_ids = tuple(int(i) for i in stop_ids)
    # A model's vocabulary is often padded past its tokenizer's (to a multiple of 64 or
    # 128): those ids are never sampled, so every generated token decodes.
    self.emit_vocab = min(cfg.vocab_size, int(getattr(tokenizer, "vocab_size", None)
                                              or cfg.vocab_size))
    self.cache_dtype = cache_dtype
    self._axes = model_api.logical_axes(cfg) if mesh is not None else None
    self.params, self.version = None, -1
    self.update_weights(params)
    self._start, self._decode, self._grow = _programs(cfg, mesh, cache_dtype)

  # --- public -------------------------------------------------------------------------------

  def update_weights(self, params) -> None:
    """Swap in new params (same structure, shapes and dtypes): no recompilation; version += 1."""
    signature = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), params)
    if self.params is not None:
      if (jax.tree.structure(self._signature) != jax.tree.structure(signature)
          or self._signature != signature):
        raise ValueError("update_weights: new params differ in structure, shape or dtype from "
                         "the current ones (that would need a different sampler)")
    if self.mesh is not None:
      from katjax.parallel import shard_params
      params = shard_params(params, self._axes, self.mesh)
    else:
      params = jax.tree.map(jnp.asarray, params)
    # Per-layer arrays: decoding reads each layer's weights in place (see split_layers).
    self.params, self._signature = model_api.split_layers(params), signature
    self.version += 1

  def generate(self, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               *, n: int = 1, seed: int = 0, keys=None,
               cancelled: Callable[[int], bool] | None = None) -> list[list[Completion]]:
    """prompts: list of int token sequences -> per prompt, a list of n Completions.

    `keys` (uint32[len(prompts) * n, 2], row-major: prompt i fork j at i*n+j) overrides the
    default keys `fold_in(PRNGKey(seed + i), j)`. `cancelled(i)` is polled between chunks;
    True stops prompt i's rows with finish_reason "cancelled".
    """
    prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
    if not prompts:
      return []
    if not isinstance(n, int) or n < 1:
      raise ValueError(f"n must be an int >= 1, got {n!r}")
    plist = _per_prompt(sampling, len(prompts))
    for sp in plist:
      if sp.stop and self.tokenizer is None:
        raise ValueError("stop strings need a Sampler with a tokenizer")
    prompts = [self._fit(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
    if keys is None:
      keys = [jax.random.fold_in(jax.random.PRNGKey(seed + i), j)
              for i in range(len(prompts)) for j in range(n)]
    keys = _key_data(keys)
    if keys.shape != (len(prompts) * n, 2):
      raise ValueError(f"keys must have shape ({len(prompts) * n}, 2), got {keys.shape}")
    per_group = max(1, self.max_batch // n)
    out = []
    for g in range(0, len(prompts), per_group):
      sl = slice(g, g + per_group)
      cancel = None if cancelled is None else (lambda i, g=g: cancelled(g + i))
      out += self._run_group(prompts[sl], plist[sl], n, keys[g * n:(g + per_group) * n], cancel)
    return out

  def fork(self, prompt, n: int, sampling: SamplingParams | None = None, *, seed: int = 0,
           keys=None) -> list[Completion]:
    """n continuations of one prompt sharing its prefilled cache (tree rollouts)."""
    return self.generate([prompt], sampling, n=n, seed=seed, keys=keys)[0]

  # --- host-side checks -------------------------------------------------------------------

  def _check_prompt(self, i, p):
    arr = np.asarray(p)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of int token ids")
    if arr.min() < 0 or arr.max() >= self.cfg.vocab_size:
      raise ValueError(f"prompt {i}: token ids must lie in [0, {self.cfg.vocab_size})")
    return arr.astype(np.int32)

  def _fit(self, i, p, sp):
    if sp.max_new_tokens >= self.max_len:
      raise ValueError(f"max_new_tokens={sp.max_new_tokens} must be < the sampler's "
                       f"max_len={self.max_len}")
    room = self.max_len - sp.max_new_tokens
    if len(p) > room:
      if not self.truncate_prompt:
        raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                         f"{sp.max_new_tokens} the cache (max_len={self.max_len}) holds at most "
                         f"{room} prompt tokens (pass truncate_prompt=True to keep the last ones)")
      p = p[len(p) - room:]
    return p

  # --- batch execution ----------------------------------------------------------------------

  def _run_group(self, prompts, plist, n, keys, cancelled):
    u, rows = len(prompts), len(prompts) * n
    lens = np.array([len(p) for p in prompts], np.int32)
    tp = min(bucket(lens.max()), self.max_len)
    # The cache starts just big enough for the prompts and one chunk and doubles when the
    # next chunk needs it (up to what the longest request can use): decode attention reads
    # every slot each step, so a cache twice the live length would double its cost.
    full_len = min(bucket(max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, plist))),
                   self.max_len)
    cache_len = min(bucket(tp + self.chunk), full_len)
    bu, b = bucket(u, 1), bucket(rows, 1)
    tokens = np.zeros((bu, tp), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    src = np.zeros(b, np.int32)
    src[:rows] = np.repeat(np.arange(u), n)
    row_sp = [plist[i] for i in src[:rows]]
    samp = _sampling_arrays(row_sp, b, self.stop_ids, self.emit_vocab)
    k = np.zeros((b, 2), np.uint32)
    k[:rows] = keys
    lens_full = np.ones(bu, np.int32)
    lens_full[:u] = lens
    state, first = self._start(self.params, jnp.asarray(tokens), jnp.asarray(lens_full),
                               jnp.asarray(src), samp, jnp.asarray(k), rows=b,
                               cache_len=cache_len)
    outs = [jax.device_get(first)]
    done_host = np.zeros(b, bool)
    done_host[rows:] = True
    reasons = [None] * b
    texts = [None] * b
    max_steps = max(sp.max_new_tokens for sp in plist)
    steps = 1
    while True:
      self._host_stops(outs, row_sp, rows, reasons, texts, done_host, cancelled, src)
      dev_done = np.asarray(jax.device_get(state["done"]))
      if (dev_done | done_host).all() or steps >= max_steps:
        break
      if done_host.any():
        state["done"] = state["done"] | jnp.asarray(done_host)
      need = int(lens.max()) + steps + self.chunk  # slots written by the end of this chunk
      if need > cache_len and cache_len < full_len:
        cache_len = min(bucket(need), full_len)
        state["cache"] = self._grow(state["cache"], size=cache_len)
      state, chunk_out = self._decode(self.params, state, steps=self.chunk)
      outs.append(jax.device_get(chunk_out))
      steps += self.chunk
    return self._assemble(outs, row_sp, u, n, lens, src, reasons, texts)

  def _host_stops(self, outs, row_sp, rows, reasons, texts, done_host, cancelled, src):
    """Marks rows done for cancellation or a stop string; records the cut."""
    if cancelled is not None:
      for r in range(rows):
        if not done_host[r] and reasons[r] is None and cancelled(int(src[r])):
          reasons[r], done_host[r] = "cancelled", True
    if self.tokenizer is None:
      return
    for r in range(rows):
      sp = row_sp[r]
      if done_host[r] or not sp.stop:
        continue
      toks = _row_tokens(outs, r)
      text = self.tokenizer.decode(toks)
      hits = [text.find(s) for s in sp.stop if s in text]
      if hits:
        cut = min(hits)
        # the first token count whose text already contains a stop string
        keep = next(k for k in range(1, len(toks) + 1)
                    if any(s in self.tokenizer.decode(toks[:k]) for s in sp.stop))
        reasons[r], texts[r], done_host[r] = ("stop", keep), text[:cut], True

  def _assemble(self, outs, row_sp, u, n, lens, src, reasons, texts):
    cat = {k: np.concatenate([o[k] for o in outs], axis=1) for k in outs[0]}
    results = [[] for _ in range(u)]
    for r in range(u * n):
      valid = cat["valid"][r]
      cnt = int(valid.sum())
      reason = reasons[r]
      if isinstance(reason, tuple):
        reason, cnt = reason[0], min(cnt, reason[1])
      elif reason is None:
        last = cat["tokens"][r, cnt - 1] if cnt else -1
        stops = row_sp[r].stop_ids if row_sp[r].stop_ids is not None else self.stop_ids
        reason = "stop" if cnt and int(last) in stops else "length"
      comp = Completion(tokens=cat["tokens"][r, :cnt].astype(np.int32),
                        logprobs=cat["logp"][r, :cnt].astype(np.float32),
                        raw_logprobs=cat["raw"][r, :cnt].astype(np.float32),
                        entropy=cat["ent"][r, :cnt].astype(np.float32),
                        finish_reason=reason, prompt_len=int(lens[src[r]]),
                        version=np.full(cnt, self.version, np.int32))
      if self.tokenizer is not None:
        comp.text = texts[r] if texts[r] is not None else self.tokenizer.decode(comp.tokens)
      results[int(src[r])].append(comp)
    return results


# --- jitted pieces ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _programs(cfg, mesh, cache_dtype):
  """(start, decode, grow) jitted once per model config: samplers and engines over the same
  model (a reference and an engine, a sampler rebuilt after a restart) share compilations."""
  platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
  opts = _CPU_COMPILER_OPTIONS if platform == "cpu" else None
  start = jax.jit(functools.partial(_start, cfg, mesh, cache_dtype),
                  static_argnames=("rows", "cache_len"), compiler_options=opts)
  decode = jax.jit(functools.partial(_decode_chunk, cfg), static_argnames=("steps", "top"),
                   donate_argnums=(1,), compiler_options=opts)
  return start, decode, jax.jit(_grow_cache, static_argnames=("size",))


def _start(cfg, mesh, cache_dtype, params, tokens, lengths, src, samp, keys, *, rows, cache_len):
  """Prefill unique prompts int[U, Tp], copy cache rows to `rows` forks, sample token 0."""
  bu, tp = tokens.shape
  cache = model_api.init_cache(cfg, bu, cache_len, cache_dtype)
  positions = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (bu, tp))
  # Slots past a prompt's end hold padding K/V; they are overwritten before any query sees
  # them (slot s is visible to query slot q only when s <= q).
  logits, cache = model_api.forward_with_cache(cfg, params, tokens, positions, cache,
                                               jnp.zeros(bu, jnp.int32),
                                               logits_index=lengths - 1)
  last = logits[:, 0]
  cache = jax.tree.map(lambda c: jnp.take(c, src, axis=0), cache)  # fork: copy rows
  if mesh is not None:
    from katjax.parallel import logical_sharding
    cache = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, logical_sharding(
        ("batch", "kv_heads", "length", "head_dim"), c.shape, mesh)), cache)
  last, index = last[src], lengths[src]
  count = jnp.zeros(rows, jnp.int32)
  tok, logp, raw, ent = _sample(last, keys, count, samp)
  done = _finished(tok, count + 1, samp)
  state = dict(cache=cache, last=tok, index=index, count=count + 1, done=done, keys=keys,
               samp=samp)
  first = dict(tokens=tok[:, None], logp=logp[:, None], raw=raw[:, None], ent=ent[:, None],
               valid=jnp.ones((rows, 1), bool))
  return state, first


def _decode_chunk(cfg, params, state, *, steps, top=0):
  """Up to `steps` decode steps (stops early once every row is done).

  top > 0 also records the `top` most likely ids and raw logprobs per step (OpenAI
  `top_logprobs`); a separate compiled program, so requests without it pay nothing.
  """
  b = state["last"].shape[0]
  buf = dict(tokens=jnp.zeros((b, steps), jnp.int32), logp=jnp.zeros((b, steps), jnp.float32),
             raw=jnp.zeros((b, steps), jnp.float32), ent=jnp.zeros((b, steps), jnp.float32),
             valid=jnp.zeros((b, steps), bool))
  if top:
    buf.update(top_ids=jnp.zeros((b, steps, top), jnp.int32),
               top_lp=jnp.zeros((b, steps, top), jnp.float32))

  def cond(carry):
    j, st, _ = carry
    return (j < steps) & ~jnp.all(st["done"])

  def body(carry):
    j, st, out = carry
    active = ~st["done"]
    logits, cache = model_api.forward_with_cache(cfg, params, st["last"][:, None],
                                                 st["index"][:, None], st["cache"], st["index"])
    tok, logp, raw, ent = _sample(logits[:, 0], st["keys"], st["count"], st["samp"])
    count = st["count"] + active
    done = st["done"] | (active & _finished(tok, count, st["samp"]))
    new = dict(st, cache=cache, last=jnp.where(active, tok, st["last"]),
               index=st["index"] + active, count=count, done=done)
    vals = dict(tokens=tok, logp=logp, raw=raw, ent=ent, valid=active)
    if top:
      vals["top_lp"], vals["top_ids"] = top_logprobs(logits[:, 0], top)
    out = {k: out[k].at[:, j].set(vals[k]) for k in out}
    return j + 1, new, out

  _, state, buf = jax.lax.while_loop(cond, body, (jnp.int32(0), state, buf))
  return state, buf


def top_logprobs(logits, k):
  """logits f32[B, V] -> (raw logprobs f32[B, k], ids int32[B, k]), most likely first."""
  lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), k)
  return lp, ids.astype(jnp.int32)


def _grow_cache(cache, *, size):
  """Zero-pad every layer's k, v [B, KV, S, D] to S = size (new slots are unwritten)."""
  pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, size - c.shape[2]), (0, 0)))
  return jax.tree.map(pad, cache)


# --- host helpers -----------------------------------------------------------------------------


def _per_prompt(sampling, count):
  if sampling is None:
    sampling = SamplingParams()
  if isinstance(sampling, SamplingParams):
    return [sampling] * count
  sampling = list(sampling)
  if len(sampling) != count or not all(isinstance(p, SamplingParams) for p in sampling):
    raise ValueError(f"sampling must be one SamplingParams or a list of {count} of them")
  return sampling


def _sampling_arrays(row_sp, b, default_stops, vocab):
  """Per-row sampling settings as device arrays; `vocab`: ids at or past it are never
  sampled (`Sampler.emit_vocab`)."""
  stops = [sp.stop_ids if sp.stop_ids is not None else default_stops for sp in row_sp]
  width = bucket(max([1] + [len(s) for s in stops]), 4)  # bucketed: few compiled shapes
  stop_ids = np.full((b, width), -1, np.int32)
  for r, s in enumerate(stops):
    stop_ids[r, :len(s)] = s
  pad = b - len(row_sp)
  col = lambda f, dt, fill: jnp.asarray(np.array([f(sp) for sp in row_sp] + [fill] * pad, dt))
  return dict(temperature=col(lambda s: s.temperature, np.float32, 0.0),
              top_p=col(lambda s: s.top_p, np.float32, 1.0),
              top_k=col(lambda s: s.top_k, np.int32, 0),
              max_new=col(lambda s: s.max_new_tokens, np.int32, 1),
              stop_ids=jnp.asarray(stop_ids), vocab=jnp.full((b,), vocab, jnp.int32))


def _key_data(keys):
  """Raw uint32[N, 2] key data from a list/array of legacy or typed PRNG keys."""
  if isinstance(keys, (list, tuple)):
    keys = jnp.stack([jnp.asarray(k) if not _typed(k) else jax.random.key_data(k)
                      for k in keys])
  elif _typed(keys):
    keys = jax.random.key_data(keys)
  return np.asarray(jax.device_get(keys)).astype(np.uint32)


def _typed(k):
  return hasattr(k, "dtype") and jnp.issubdtype(k.dtype, jax.dtypes.prng_key)


def _row_tokens(outs, r):
  toks = np.concatenate([o["tokens"][r] for o in outs])
  valid = np.concatenate([o["valid"][r] for o in outs])
  return toks[valid]
