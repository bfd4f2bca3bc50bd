"""Synthetic trajectory groups and prune trees shared by the tests and the benchmarks.

`realistic_groups` has the shape of agentic RL groups (long prompt, many turns, forks at
turn boundaries); `random_group` is a small adversarial group for property tests (forks
anywhere, differing masks on shared tokens, duplicates); `random_tree` is a random
pre-order node tree for the pruning kernel. Tests import these from here (never from
`katjax.bench`), benchmarks too.
"""

from __future__ import annotations

import numpy as np

from katjax.core import prune
from katjax.core.fields import TOOL_CALL, TOOL_RESULT
from katjax.core.tree import Trajectory


def realistic_groups(num_tasks: int = 2, *, rollouts: int = 8, prompt_len=(1000, 2000),
                     turns=(4, 12), assistant_len=(20, 200), tool_len=(50, 500),
                     vocab_size: int = 256, seed: int = 0) -> list:
  """Agentic groups: list (one per task) of `rollouts` Trajectory sharing prefixes.

  Rollout 0 is a prompt followed by turns (assistant span: trained, its last 8 tokens
  flagged TOOL_CALL; tool output: not trained, flagged TOOL_RESULT). Rollout k forks from a
  random earlier rollout after a random number of its turns (the shared part, rollout
  logprobs included, is copied: what a tree sampler produces) and continues with new turns.
  Rewards are random in {0, 1}; advantages are GRPO-normalised within the group.
  """
  from katjax.core.advantages import grpo_advantages

  rng = np.random.default_rng(seed)
  groups = []
  for task in range(num_tasks):
    prompt = _span(rng, rng.integers(*prompt_len, endpoint=True), vocab_size, False, 0)
    runs = []  # each: list of turn spans, prompt first
    for k in range(rollouts):
      n_turns = int(rng.integers(*turns, endpoint=True))
      if k == 0:
        spans = [prompt]
      else:
        parent = runs[int(rng.integers(0, k))]
        fork = int(rng.integers(0, len(parent)))  # share prompt + `fork` turns' worth
        spans = list(parent[:1 + fork])
      while len(spans) < 1 + 2 * n_turns:
        spans.append(_span(rng, rng.integers(*assistant_len, endpoint=True), vocab_size, True,
                           TOOL_CALL))
        spans.append(_span(rng, rng.integers(*tool_len, endpoint=True), vocab_size, False,
                           TOOL_RESULT))
      runs.append(spans)
    rewards = rng.integers(0, 2, rollouts).astype(np.float64)
    adv = np.asarray(grpo_advantages(rewards, np.zeros(rollouts, np.int32)), np.float64)
    groups.append([_join(s, rewards[k], adv[k], task) for k, s in enumerate(runs)])
  return groups


def random_group(rng: np.random.Generator, *, vocab_size: int = 256, branches: int = 5,
                 prompt_len=(1, 12), piece_len=(0, 10), group_id: int = 0) -> list:
  """A small random group for property tests: forks anywhere, prefixes and duplicates.

  Shared tokens copy the rollout logprobs/entropy/flags of the rollout they fork from; the
  loss mask of a shared token is re-drawn with probability 0.3, so masks differ between
  branches on shared tokens. Advantages are drawn from {-1.5, -0.5, 0, 0.7, 2} times noise.
  """
  n0 = int(rng.integers(*prompt_len, endpoint=True))
  runs = [_random_piece(rng, n0, vocab_size)]
  runs[0]["loss_mask"][:] = 0
  for _ in range(branches - 1):
    parent = runs[int(rng.integers(0, len(runs)))]
    fork = int(rng.integers(1, len(parent["tokens"]) + 1))
    shared = {k: v[:fork].copy() for k, v in parent.items()}
    flip = rng.random(fork) < 0.3
    shared["loss_mask"][flip] = rng.integers(0, 2, int(flip.sum()))
    extra = _random_piece(rng, int(rng.integers(*piece_len, endpoint=True)), vocab_size)
    runs.append({k: np.concatenate([shared[k], extra[k]]) for k in shared})
  out = []
  for r in runs:
    r["loss_mask"][0] = 0
    adv = float(rng.choice([-1.5, -0.5, 0.0, 0.7, 2.0]) * rng.uniform(0.5, 1.5))
    out.append(Trajectory(**r, reward=float(rng.random()), advantage=adv, group_id=group_id))
  return out


def _random_piece(rng, n, vocab_size):
  return {"tokens": rng.integers(0, vocab_size, n).astype(np.int32),
          "loss_mask": rng.integers(0, 2, n).astype(np.int8),
          "logprobs": -rng.exponential(1.0, n).astype(np.float32),
          "entropy": rng.exponential(1.0, n).astype(np.float32),
          "flags": rng.integers(0, 8, n).astype(np.int32)}


def _span(rng, n, vocab_size, trained, flag):
  n = int(n)
  logp = -rng.exponential(0.5, n).astype(np.float32) if trained else np.zeros(n, np.float32)
  flags = np.zeros(n, np.int32)
  if flag == TOOL_CALL:
    flags[-8:] = TOOL_CALL
  elif flag:
    flags[:] = flag
  return {"tokens": rng.integers(0, vocab_size, n).astype(np.int32),
          "loss_mask": np.full(n, int(trained), np.int8), "logprobs": logp,
          "entropy": np.abs(logp) * 2, "flags": flags}


def _join(spans, reward, advantage, group_id):
  cat = {k: np.concatenate([s[k] for s in spans]) for k in spans[0]}
  cat["loss_mask"][0] = 0
  return Trajectory(**cat, reward=float(reward), advantage=float(advantage),
                    group_id=group_id)


def random_tree(n: int, seed: int = 0) -> prune.Nodes:
  """A random pre-order tree of n nodes shaped like split agentic trees: long chains (turns)
  with forks at random depths; costs 20-500 tokens, every other node without entropy."""
  rng = np.random.default_rng(seed)
  parent = np.empty(n, np.int64)
  parent[0] = -1
  stack = [0]
  u = rng.random(n)
  for i in range(1, n):
    if u[i] < 0.15:  # fork: continue from a random node on the current path
      del stack[int(u[i] / 0.15 * len(stack)) + 1:]
    parent[i] = stack[-1]
    stack.append(i)
  ent = np.where(rng.random(n) < 0.5, 0.0, rng.exponential(50.0, n))
  nodes, _ = prune.make_nodes(parent, rng.integers(20, 500, n), ent,
                              rng.integers(1, 9, n), rng.random(n) < 0.05)
  return nodes
