"""Trajectory manager (skeleton): token-in/token-out records per agent session.

Agents talk to the OpenAI endpoint unchanged; the session is the URL path
(`/sessions/<id>/v1/chat/completions`, see `katjax.rollout.server.serve(recorder=...)`). For
every call the manager records exactly the ids the engine consumed (the rendered prompt) and
produced (with their sampling logprobs and policy versions): ids are never re-derived by
re-tokenising text.

A session is a list of branches. A call whose prompt starts with the current branch's tokens
(everything the model saw and produced so far) extends that branch: the new prompt tokens
(tool results, the next user turn) get loss mask 0, the generated ones 1. A prompt that does
not (a chat template that rewrote history, e.g. dropped earlier reasoning; a scaffold that
truncated) starts a new branch and is counted in `prefix_mismatches`: training on the old
branch's ids would be training on tokens the model never saw in that context. Branches become
`katjax.core.tree.Trajectory`s; `build_tree` merges a group's branches by longest common
prefix, so the branches of one session share their common history in the tree.

Not yet here (issue 16): rewards and groups, the buffer feeding the trainer, staleness.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from katjax.core.tree import Trajectory

__all__ = ["Branch", "TrajectoryManager"]


@dataclasses.dataclass
class Branch:
  """One token-exact sequence: per token the loss mask, sampling logprob and version."""

  tokens: list = dataclasses.field(default_factory=list)
  loss_mask: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  version: list = dataclasses.field(default_factory=list)  # -1 on tokens the model only read

  def add(self, ids, generated=False, logprobs=None, version=None):
    k = len(ids)
    self.tokens += [int(t) for t in ids]
    self.loss_mask += [int(generated)] * k
    self.logprobs += [0.0] * k if logprobs is None else [float(x) for x in logprobs]
    self.version += [-1] * k if version is None else [int(v) for v in version]


class TrajectoryManager:
  """Records calls per session; thread-safe (one HTTP handler thread per call)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.sessions: dict[str, list[Branch]] = {}
    self.stats = collections.Counter()

  def record(self, session: str, prompt_ids, completion) -> None:
    """One call of `session`: prompt ids in, a `Completion` out (fork 0)."""
    prompt = [int(t) for t in prompt_ids]
    with self._lock:
      branches = self.sessions.get(session)
      if branches is None:
        branches = self.sessions[session] = []
        self.stats["sessions"] += 1
      self.stats["calls"] += 1
      br = branches[-1] if branches else None
      if br is not None and prompt[:len(br.tokens)] == br.tokens:
        br.add(prompt[len(br.tokens):])
      else:
        if br is not None:
          self.stats["prefix_mismatches"] += 1
        br = Branch()
        br.add(prompt)
        branches.append(br)
      br.add(completion.tokens, generated=True, logprobs=completion.logprobs,
             version=completion.version)

  def __call__(self, session, request, completions):
    """The server's recorder hook."""
    self.record(session, request.prompt_ids, completions[0])

  def trajectories(self, session: str, reward: float = 0.0, group_id: int = 0):
    """The session's branches as `Trajectory`s (input of `katjax.core.tree.build_tree`)."""
    with self._lock:
      branches = list(self.sessions.get(session, []))
    out = []
    for br in branches:
      versions = [v for v in br.version if v >= 0]
      out.append(Trajectory(tokens=np.asarray(br.tokens, np.int32),
                            loss_mask=np.asarray(br.loss_mask, np.int8),
                            logprobs=np.asarray(br.logprobs, np.float32), reward=reward,
                            group_id=group_id, policy_version=min(versions, default=0)))
    return out
