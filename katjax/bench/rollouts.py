"""Multi-turn agents against the engine vs today's static batches (part of bench.sampler).

Each of `agents` threads runs a conversation: a system prompt shared by all agents, its own
task, then `turns` model turns; each turn's prompt is the whole history so far (as an agent
scaffold re-sends it), the answer has a random length (greedy, no stop ids, a per-turn
`max_new_tokens`), and a "tool" sleeps a lognormal time before its result joins the history.

- static: the server as it was before the engine: a worker takes every waiting request and
  runs them as one `Sampler.generate` batch; requests arriving meanwhile wait for the whole
  batch, which runs until its longest answer ends; every prompt is prefilled in full.
- engine: `katjax.rollout.engine.Engine` (continuous batching + prefix caching).

Both run the same conversations (same seeds, same tool times) on the same weights; the
workload runs once to compile, then once timed. Reported: generated tokens/s of wall time,
the ratio, and the engine's prefix-cache hit rate (prompt tokens read from cache).
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from katjax.rollout.engine import Engine
from katjax.rollout.sampler import Sampler, SamplingParams


def multiturn(cfg, params, *, agents=16, turns=4, system_len=48, task_len=8, tool_len=16,
              min_new=8, max_new=48, tool_s=0.05, chunk=16, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  vocab = min(cfg.vocab_size, 256)
  system = rng.integers(1, vocab, system_len).tolist()
  plan = [dict(task=rng.integers(1, vocab, task_len).tolist(),
               new=rng.integers(min_new, max_new + 1, turns).tolist(),
               tools=[rng.integers(1, vocab, tool_len).tolist() for _ in range(turns)],
               sleep=(tool_s * rng.lognormal(0.0, 1.0, turns)).tolist()) for _ in range(agents)]
  max_len = 1 << (system_len + task_len + turns * (max_new + tool_len)).bit_length()
  out = {"agents": agents, "turns": turns, "system_len": system_len, "chunk": chunk}
  for name in ("static", "engine"):
    sampler = Sampler(cfg, params, max_len=max_len, stop_ids=(), chunk=chunk, max_batch=agents)
    backend = _Static(sampler) if name == "static" else Engine(sampler, rows=agents)
    try:
      _run(backend, system, plan)  # compile
      if name == "engine":
        before = backend.snapshot()
      t0 = time.perf_counter()
      tokens = _run(backend, system, plan)
      secs = time.perf_counter() - t0
      out[f"{name}_tokens_per_s"] = tokens / secs
      out[f"{name}_seconds"] = secs
      if name == "engine":
        after = backend.snapshot()
        prompt = after["prompt_tokens"] - before["prompt_tokens"]
        out["prefix_cache_hit_rate"] = (after["prefix_hit_tokens"]
                                        - before["prefix_hit_tokens"]) / prompt
        out["engine_mean_rows_per_chunk"] = ((after["row_chunks"] - before["row_chunks"])
                                             / max(1, after["chunks"] - before["chunks"]))
    finally:
      backend.close()
  out["generated_tokens"] = tokens
  out["speedup"] = out["engine_tokens_per_s"] / out["static_tokens_per_s"]
  return out


def _run(backend, system, plan) -> int:
  """All agents to the end; returns the generated token count."""
  counts = [0] * len(plan)

  def agent(i):
    p = plan[i]
    history = system + p["task"]
    for t, new in enumerate(p["new"]):
      sp = SamplingParams(temperature=0.0, max_new_tokens=new)
      (comp,), = backend.generate([np.asarray(history, np.int32)], sp, seed=1000 * i + t)
      counts[i] += len(comp.tokens)
      time.sleep(p["sleep"][t])
      history = history + comp.tokens.tolist() + p["tools"][t]

  threads = [threading.Thread(target=agent, args=(i,)) for i in range(len(plan))]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  return sum(counts)


class _Static:
  """The pre-engine server: take every waiting request, run one static batch, repeat."""

  def __init__(self, sampler):
    self.sampler = sampler
    self._queue = collections.deque()
    self._cv = threading.Condition()
    self._stop = False
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def generate(self, prompts, sampling, seed=0):
    job = dict(prompt=prompts[0], sampling=sampling, seed=seed, done=threading.Event())
    with self._cv:
      self._queue.append(job)
      self._cv.notify()
    job["done"].wait()
    return [job["result"]]

  def close(self):
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._thread.join()

  def _loop(self):
    while True:
      with self._cv:
        while not self._queue and not self._stop:
          self._cv.wait()
        if self._stop:
          return
        batch = list(self._queue)
        self._queue.clear()
      import jax
      keys = [jax.random.fold_in(jax.random.PRNGKey(j["seed"]), 0) for j in batch]
      out = self.sampler.generate([j["prompt"] for j in batch], [j["sampling"] for j in batch],
                                  keys=keys)
      for job, comps in zip(batch, out):
        job["result"] = comps
        job["done"].set()
