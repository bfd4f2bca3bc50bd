"""Tree vs flat training benchmark per model shape (groups from `katjax.testing.trees`).

`python -m katjax.bench.tree` builds agentic groups (8 rollouts per task, forks at random
turns), packs them once as prefix trees and once as flat unshared sequences, and times the
jitted RL train step on each layout, alternating flat and tree steps in one process and
taking medians, so load on a shared machine hits both alike. Both layouts run the same
attention kernel (`katjax.model.tile_attention`: only the tiles the mask touches, block size
chosen per layout). Two model shapes (`SHAPES`):

- `attention_bound`: the tiny model on the issue's groups (1-2k-token prompt, 4-12 turns,
  ~20k-token tree rows): attention dominates its FLOPs, so the attention ratio is the limit;
- `per_token`: a wider, shallower model on shorter trees: the per-token layers dominate, as
  in a large policy, so the limit approaches the token ratio.

Per shape it prints: flat_tokens, tree_tokens, token_ratio (flat / tree), attention_ratio
(visible query-key pairs flat / tree), flop_ratio (training FLOPs flat / tree: the compute
limit), per_token_flop_share (of the tree step), flat_step_s, tree_step_s (medians),
speedup (median of the alternating flat / tree ratios), speedup_vs_flop_ratio,
speedup_vs_token_ratio, attention_efficiency (visible pairs / pairs the kernel computed, the
same tiles forward and in both backward products) for the tree and flat rows, the chosen
block sizes, and the device memory of each compiled step.
"""

from __future__ import annotations

import numpy as np

from katjax.testing.trees import realistic_groups

# Model shape (ModelConfig fields) and group shape (realistic_groups arguments) per case.
SHAPES = {
    "attention_bound": {"model": {}, "groups": {}},
    "per_token": {"model": dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                ffn_dim=1024),
                  "groups": dict(prompt_len=(300, 600), turns=(2, 5), assistant_len=(20, 100),
                                 tool_len=(20, 150))},
}
# Rows are padded to a multiple of this (the largest tile block).
ROW_MULTIPLE = 256


def run(num_tasks: int = 1, *, model: dict | None = None, max_tokens: int = 0,
        repeats: int = 3, seed: int = 0, **group_kw) -> dict:
  """Time the tree and flat RL steps of one model shape on the same groups (alternating)."""
  import time

  import jax

  from katjax import model as kmodel
  from katjax.core.losses import PolicyLossConfig
  from katjax.core.tree import build_tree
  from katjax.core.tree_pack import pack_trees
  from katjax.model import tile_attention
  from katjax.train import TrainState, make_optimizer
  from katjax.train.tree_step import make_tree_step

  groups = realistic_groups(num_tasks, seed=seed, **group_kw)
  trees = [build_tree(g) for g in groups]
  # Each layout gets its own smallest row length unless max_tokens is given: flat rows fit
  # the longest trajectory, tree rows the largest tree.
  up = lambda n: -(-n // ROW_MULTIPLE) * ROW_MULTIPLE  # noqa: E731
  flat_size = max_tokens or up(max(len(t) for g in groups for t in g))
  tree_size = max_tokens or up(max(t.num_tokens for t in trees))
  packed = {"tree": pack_trees(trees, tree_size),
            "flat": pack_trees([[t] for g in groups for t in g], flat_size)}
  base = kmodel.ModelConfig(**(model or {}))
  opt = make_optimizer({"learning_rate": 1e-4, "warmup_steps": 0})
  params = kmodel.init(base, jax.random.PRNGKey(seed))
  run_step, memory, blocks, tiles = {}, {}, {}, {}
  for name, batch in packed.items():
    blocks[name] = tile_attention.choose_block(batch.subtree_end)
    tiles[name] = tile_attention.tile_stats(batch.subtree_end, blocks[name])
    arrays = dict(batch.arrays(), attention_tiles=tile_attention.attention_tiles(
        batch.subtree_end, blocks[name]))
    arrays = jax.device_put(arrays)
    cfg = base.replace(attention_block=blocks[name])
    step = make_tree_step(cfg, PolicyLossConfig(eps_high=0.28), opt)
    state = TrainState.create(jax.tree.map(lambda x: x.copy(), params), opt,
                              jax.random.PRNGKey(1))
    compiled = step.lower(state, arrays).compile()
    memory[name] = _step_bytes(compiled)
    run_step[name] = _runner(compiled, state, arrays)
    run_step[name]()  # warm up
  times = {"flat": [], "tree": []}
  for _ in range(repeats):  # alternate, so slow phases of a shared machine hit both
    for name in ("flat", "tree"):
      start = time.perf_counter()
      run_step[name]()
      times[name].append(time.perf_counter() - start)
  tree, flat = packed["tree"], packed["flat"]
  flops = {k: _train_flops(base, b) for k, b in packed.items()}
  flop_ratio = flops["flat"] / flops["tree"]
  token_ratio = flat.flat_tokens / tree.tree_tokens
  speedup = float(np.median(np.array(times["flat"]) / np.array(times["tree"])))
  return {"flat_tokens": flat.flat_tokens, "tree_tokens": tree.tree_tokens,
          "token_ratio": token_ratio,
          "attention_ratio": _visible_keys(flat) / _visible_keys(tree),
          "flop_ratio": flop_ratio,
          "per_token_flop_share": _per_token_flops(base, tree) / flops["tree"],
          "flat_step_s": float(np.median(times["flat"])),
          "tree_step_s": float(np.median(times["tree"])),
          "speedup": speedup, "speedup_vs_flop_ratio": speedup / flop_ratio,
          "speedup_vs_token_ratio": speedup / token_ratio,
          "attention_efficiency": tiles["tree"]["efficiency"],
          "flat_attention_efficiency": tiles["flat"]["efficiency"],
          "tree_block": blocks["tree"], "flat_block": blocks["flat"],
          "tree_tiles": tiles["tree"]["tiles"], "flat_tiles": tiles["flat"]["tiles"],
          "flat_step_bytes": memory["flat"], "tree_step_bytes": memory["tree"],
          "flat_rows": list(flat.tokens.shape), "tree_rows": list(tree.tokens.shape),
          "padded_ratio": flat.tokens.size / tree.tokens.size,
          "tasks": num_tasks, "rollouts": len(groups[0]), "repeats": repeats,
          "model": {k: getattr(base, k) for k in ("d_model", "n_layers", "n_heads", "ffn_dim")},
          "backend": jax.default_backend()}


def _runner(compiled, state, arrays):
  """A closure running one step (the state is donated, so it threads the new one)."""
  import jax

  holder = [state]

  def go():
    holder[0], metrics = compiled(holder[0], arrays)
    jax.block_until_ready(metrics)

  return go


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
  return (_per_token_flops(cfg, batch)
          + 12.0 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * _visible_keys(batch))


def _per_token_flops(cfg, batch) -> float:
  """6 x matmul params per real token (the input embedding is a gather, not a matmul; a tied
  one still serves as the LM head)."""
  embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  return 6.0 * (cfg.num_params() - embed) * float(np.sum(batch.mult > 0))


def _visible_keys(batch) -> float:
  """Exact number of visible (query, key) pairs: each real token sees its depth + 1 keys."""
  return float(np.sum((batch.positions + 1) * (batch.mult > 0)))


def main(argv=None):
  import argparse
  import json

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  p.add_argument("--tasks", type=int, default=1)
  p.add_argument("--rollouts", type=int, default=8)
  p.add_argument("--max_tokens", type=int, default=0, help="row length; 0: smallest that fits")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  out = {}
  for name in a.shapes:
    out[name] = run(a.tasks, model=SHAPES[name]["model"], max_tokens=a.max_tokens,
                    repeats=a.repeats, seed=a.seed, rollouts=a.rollouts,
                    **SHAPES[name]["groups"])
    print(json.dumps({name: out[name]}), flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
