"""Dense vs blockwise interval-mask attention: time and peak memory at T = 1k, 4k, 16k.

    python -m katjax.bench.attention [--lengths=1024,4096,16384] [--dense_limit_mb=6000]

Prints JSON {"dense": {T: {"ms", "peak_mb"}}, "blockwise": {...}, ...}. Peak memory is XLA's
own buffer assignment for the compiled forward (arguments + outputs + temporaries), which is
deterministic on a shared machine; a variant whose plan exceeds `--dense_limit_mb` is not
run and reports `ms: null` (its planned peak is still shown).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from katjax.model import attention as attn

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "4096", "16384"], "sequence lengths")
_LIMIT = flags.DEFINE_integer("dense_limit_mb", 6000, "do not run a plan above this peak")
_BLOCK = flags.DEFINE_integer("block", 512, "blockwise attention block size")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repeats (median)")

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64


def random_tree(rng, t, branch_tokens=(64, 512)):
  """subtree_end int32[1, t]: a prompt then random nested branches (an agentic group)."""
  se = np.empty(t, np.int64)

  def fill(start, end):
    while start < end:
      size = min(end - start, int(rng.integers(*branch_tokens)) * int(rng.integers(1, 5)))
      own = max(1, min(size, int(rng.integers(*branch_tokens))))
      se[start:start + own] = start + size
      fill(start + own, start + size)
      start += size

  prompt = t // 8
  se[:prompt] = t
  fill(prompt, t)
  return se[None].astype(np.int32)


def measure(fn, args, limit_mb, repeats):
  compiled = jax.jit(fn).lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
  peak_mb = round(peak / 2 ** 20, 1)
  if peak_mb > limit_mb:
    return {"ms": None, "peak_mb": peak_mb, "skipped": f"plan needs {peak_mb} MB"}
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"ms": round(1e3 * float(np.median(times)), 2), "peak_mb": peak_mb}


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  result = {"dense": {}, "blockwise": {}, "block": _BLOCK.value,
            "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
            "device": jax.devices()[0].device_kind}
  for t in map(int, _LENGTHS.value):
    q = jnp.asarray(rng.standard_normal((1, t, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, t, KV_HEADS, HEAD_DIM)), jnp.float32)
            for _ in range(2))
    se = jnp.asarray(random_tree(rng, t))
    qi = jnp.arange(t, dtype=jnp.int32)[None]
    result["dense"][str(t)] = measure(attn.dense_attention, (q, k, v, se, qi), _LIMIT.value,
                                      _REPEATS.value)
    blockwise = lambda q, k, v, se: attn.blockwise_attention(q, k, v, se, block=_BLOCK.value)
    result["blockwise"][str(t)] = measure(blockwise, (q, k, v, se), float("inf"),
                                          _REPEATS.value)
    print(json.dumps({"T": t, "dense": result["dense"][str(t)],
                      "blockwise": result["blockwise"][str(t)]}), flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
