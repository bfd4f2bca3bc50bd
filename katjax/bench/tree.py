"""Tree vs flat training benchmark (its groups come from `katjax.testing.trees`).

`python -m katjax.bench.tree` builds realistic agentic groups (8 rollouts per task, a 1-2k
token prompt, 4-12 turns, forks at random turns, tool outputs of 50-500 tokens), packs them
once as prefix trees and once as flat unshared sequences, times one jitted train step of the
tiny model on each and prints JSON: flat_tokens, tree_tokens, token_ratio (flat / tree),
flat_step_s, tree_step_s, speedup (flat_step_s / tree_step_s), plus the row shapes,
attention_ratio (visible query-key pairs flat / tree), flop_ratio (training FLOPs flat / tree:
the compute limit; the token ratio bounds only the per-token layers, and at these context
lengths the tiny model's attention dominates), speedup_vs_flop_ratio, and the device memory
of each compiled step (flat_step_bytes, tree_step_bytes): a memory budget between the two
fits the tree step and not the flat one.

The defaults give ~20k-token tree rows and take ~6 minutes on 2 quiet CPU cores (the flat step is
the slow one); `--turns 2 4 --tool_len 50 200 --assistant_len 20 100` gives ~5k-token trees.
"""

from __future__ import annotations

import numpy as np

from katjax.testing.trees import realistic_groups


def run(num_tasks: int = 1, *, max_tokens: int = 0, repeats: int = 3, seed: int = 0,
        **group_kw) -> dict:
  """Time one jitted tree step and one flat step of the tiny model on the same groups."""
  import time

  import jax

  from katjax import model as kmodel
  from katjax.core.losses import PolicyLossConfig
  from katjax.core.tree import build_tree
  from katjax.core.tree_pack import pack_trees
  from katjax.train import TrainState, make_optimizer
  from katjax.train.tree_step import make_tree_step

  groups = realistic_groups(num_tasks, seed=seed, **group_kw)
  trees = [build_tree(g) for g in groups]
  block = 512
  # Each layout gets its own smallest row length (a multiple of the attention block) unless
  # max_tokens is given: flat rows fit the longest trajectory, tree rows the largest tree.
  up = lambda n: -(-n // block) * block  # noqa: E731
  flat_size = max_tokens or up(max(len(t) for g in groups for t in g))
  tree_size = max_tokens or up(max(t.num_tokens for t in trees))
  packed = {"tree": pack_trees(trees, tree_size),
            "flat": pack_trees([[t] for g in groups for t in g], flat_size)}
  cfg = kmodel.ModelConfig(attention_block=block)
  opt = make_optimizer({"learning_rate": 1e-4, "warmup_steps": 0})
  step = make_tree_step(cfg, PolicyLossConfig(eps_high=0.28), opt)
  params = kmodel.init(cfg, jax.random.PRNGKey(seed))
  times, memory = {}, {}
  for name, batch in packed.items():
    arrays = jax.device_put(batch.arrays())
    state = TrainState.create(jax.tree.map(lambda x: x.copy(), params), opt,
                              jax.random.PRNGKey(1))
    compiled = step.lower(state, arrays).compile()
    memory[name] = _step_bytes(compiled)
    state, metrics = compiled(state, arrays)  # warm up
    jax.block_until_ready(metrics)
    runs = []
    for _ in range(repeats):
      start = time.perf_counter()
      state, metrics = compiled(state, arrays)
      jax.block_until_ready(metrics)
      runs.append(time.perf_counter() - start)
    times[name] = float(np.median(runs))
  tree, flat = packed["tree"], packed["flat"]
  flop_ratio = _train_flops(cfg, flat) / _train_flops(cfg, tree)
  speedup = times["flat"] / times["tree"]
  return {"flat_tokens": flat.flat_tokens, "tree_tokens": tree.tree_tokens,
          "token_ratio": flat.flat_tokens / tree.tree_tokens,
          "attention_ratio": _visible_keys(flat) / _visible_keys(tree),
          "flop_ratio": flop_ratio,
          "flat_step_s": times["flat"], "tree_step_s": times["tree"],
          "speedup": speedup, "speedup_vs_flop_ratio": speedup / flop_ratio,
          "flat_step_bytes": memory["flat"], "tree_step_bytes": memory["tree"],
          "flat_rows": list(flat.tokens.shape), "tree_rows": list(tree.tokens.shape),
          "padded_ratio": flat.tokens.size / tree.tokens.size,
          "tasks": num_tasks, "rollouts": len(groups[0]), "repeats": repeats,
          "backend": jax.default_backend()}


def _step_bytes(compiled) -> int:
  """Device memory the compiled step needs: arguments + outputs (less donated) + temporaries."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def _train_flops(cfg, batch) -> float:
  """Training FLOPs the batch needs at the least: 6 x matmul params per real token, plus
  12 x layers x heads x head_dim per visible (query, key) pair (scores and values, fwd+bwd).

  The compute limit of the tree speedup is the ratio of this between layouts: the token
  ratio bounds the per-token layers, the attention ratio the attention, and which dominates
  depends on the model width against the context length.
  """
  # The input embedding is a gather, not a matmul; a tied one still serves as the LM head.
  embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  matmul_params = cfg.num_params() - embed
  tokens = float(np.sum(batch.mult > 0))
  return (6.0 * matmul_params * tokens
          + 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * _visible_keys(batch))


def _visible_keys(batch) -> float:
  """Exact number of visible (query, key) pairs: each real token sees its depth + 1 keys."""
  return float(np.sum((batch.positions + 1) * (batch.mult > 0)))


def main(argv=None):
  import argparse
  import json

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", type=int, default=1)
  p.add_argument("--rollouts", type=int, default=8)
  p.add_argument("--max_tokens", type=int, default=0, help="row length; 0: smallest that fits")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prompt_len", type=int, nargs=2, default=(1000, 2000))
  p.add_argument("--turns", type=int, nargs=2, default=(4, 12))
  p.add_argument("--tool_len", type=int, nargs=2, default=(50, 500))
  p.add_argument("--assistant_len", type=int, nargs=2, default=(20, 200))
  a = p.parse_args(argv)
  print(json.dumps(run(a.tasks, max_tokens=a.max_tokens, repeats=a.repeats, seed=a.seed,
                       rollouts=a.rollouts, prompt_len=tuple(a.prompt_len),
                       turns=tuple(a.turns), tool_len=tuple(a.tool_len),
                       assistant_len=tuple(a.assistant_len))))


if __name__ == "__main__":
  main()
