"""Trajectory manager (SeamlessFlow, DESIGN.md section 6): token-exact records per session.

Agents talk to the inference engine through the manager (the OpenAI proxy or the in-process
`RecordingBackend`); every call reports the exact ids the engine consumed (`prompt`) and
produced (`output`), the sampler's logprob of each produced token and the policy version
that produced it. The manager never re-tokenises text: training data are these ids.

A session (one episode) is a list of branches. A call whose prompt extends a branch (the
branch's tokens are a prefix of the prompt, the usual multi-turn case: earlier turns, then
tool results) appends to it: the new prompt tokens as context (loss mask 0), the output as
trained tokens. A prompt that extends no branch means the client changed history (a chat
template that drops earlier reasoning, an edited transcript, a retried turn): the call
starts a new branch that shares the longest common prefix with the session's branches
(their per-token records are kept for that prefix) and takes the rest of the prompt as
context, never as trained tokens; `stats["prefix_mismatches"]` counts these. Branches of
one task's sessions become one prefix tree later (`build_tree` merges shared prefixes).

Admission follows AReaL's staleness rule: a new trajectory may start only while
accepted + running <= (eta + version + 1) x batch_trajectories, so with eta = 0 each policy
version generates exactly one batch (the synchronous schedule) and eta > 0 lets rollouts
run up to eta versions ahead of the trainer.

Everything here is host-side Python under one lock (the proxy serves many threads); the
whole state is a plain dict (`state_dict` / `load_state_dict`) for the trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import threading
import zlib

import numpy as np

from katjax.core.tree import Trajectory


@dataclasses.dataclass
class Branch:
  """One linear token record: per token id, trained mask, behaviour logprob, entropy, version."""

  tokens: list
  loss_mask: list
  logprobs: list
  entropy: list
  version: list

  def extend(self, ids, *, trained: bool, logprobs=None, entropy=None, version: int = 0):
    n = len(ids)
    self.tokens += [int(t) for t in ids]
    self.loss_mask += [int(trained)] * n
    self.logprobs += _floats(logprobs, n)
    self.entropy += _floats(entropy, n)
    versions = np.broadcast_to(np.asarray(version, np.int64), (n,))
    self.version += [int(v) for v in versions]

  def prefix(self, n: int) -> "Branch":
    return Branch(*(list(getattr(self, f.name)[:n]) for f in dataclasses.fields(self)))

  def to_trajectory(self, reward: float, group_id: int) -> Trajectory:
    mask = np.asarray(self.loss_mask, np.int8)
    mask[0] = 0  # the first token has no predicting context
    return Trajectory(tokens=np.asarray(self.tokens, np.int32), loss_mask=mask,
                      logprobs=np.asarray(self.logprobs, np.float32),
                      entropy=np.asarray(self.entropy, np.float32),
                      version=np.asarray(self.version, np.int32), reward=reward,
                      group_id=group_id, policy_version=min(self.trained_versions(), default=0))

  def trained_versions(self) -> list:
    return [v for v, m in zip(self.version, self.loss_mask) if m]


@dataclasses.dataclass
class Session:
  task: str
  group: int
  branches: list = dataclasses.field(default_factory=list)
  reward: float | None = None
  info: dict = dataclasses.field(default_factory=dict)


class TrajectoryManager:
  """Records sessions token-exactly, admits rollouts by staleness, buffers finished groups.

  group_size: sessions per task group (GRPO needs all of a group before it trains);
  batch_groups: groups per train step; eta: staleness bound (None = unbounded).
  """

  def __init__(self, group_size: int, batch_groups: int, eta: int | None = 0):
    if group_size < 1 or batch_groups < 1:
      raise ValueError(f"group_size and batch_groups must be >= 1, got {group_size}, "
                       f"{batch_groups}")
    if eta is not None and eta < 0:
      raise ValueError(f"eta (staleness bound) must be >= 0 or None, got {eta}")
    self.group_size, self.batch_groups, self.eta = group_size, batch_groups, eta
    self._lock = threading.Lock()
    self.version = 0
    self.sessions: dict[str, Session] = {}
    self.groups: dict[int, list[str]] = {}  # group id -> its sessions' ids
    self.ready: list[int] = []  # finished, untrained groups, in finishing order
    self.next_group = 0
    self.accepted = 0  # trajectories admitted so far (running or done), AReaL's N_accepted
    self.running = 0
    # Sessions of aborted groups: a sibling still running when its group was dropped keeps
    # calling and finishes later; those calls and its grade are ignored (counted), never
    # recorded as a new "unknown" session (a partial trajectory, trained as its own group).
    self.dropped: set[str] = set()
    self.stats = {"calls": 0, "prefix_mismatches": 0, "forks": 0, "unknown_sessions": 0,
                  "aborted": 0, "trained_groups": 0, "late_calls": 0}

  # --- admission and versions -------------------------------------------------------------

  @property
  def batch_trajectories(self) -> int:
    return self.group_size * self.batch_groups

  def can_admit(self, n: int = 1) -> bool:
    """Whether n more trajectories may start now under the staleness bound."""
    with self._lock:
      return self._can_admit(n)

  def start_group(self, task: str, session_ids) -> int:
    """Admit one task's group of sessions (group_size ids); returns its group id."""
    session_ids = list(session_ids)
    if len(session_ids) != self.group_size:
      raise ValueError(f"start_group: {len(session_ids)} sessions, group_size is "
                       f"{self.group_size}")
    with self._lock:
      if not self._can_admit(len(session_ids)):
        raise RuntimeError("start_group: over the staleness bound; check can_admit() first")
      dup = [s for s in session_ids if s in self.sessions]
      if dup:
        raise ValueError(f"start_group: session ids already in use: {dup}")
      gid = self._new_group_id()
      self.groups[gid] = session_ids
      for s in session_ids:
        self.sessions[s] = Session(task=task, group=gid)
      self.accepted += len(session_ids)
      self.running += len(session_ids)
      return gid

  def set_version(self, version: int) -> None:
    """The trainer published weights `version`: admission widens by one batch per version."""
    with self._lock:
      if version < self.version:
        raise ValueError(f"policy version went back from {self.version} to {version}")
      self.version = int(version)

  # --- recording --------------------------------------------------------------------------

  def record(self, session: str, prompt, output, logprobs=None, entropy=None,
             version=None) -> dict:
    """One engine call of `session`: the exact prompt ids in, output ids out.

    version: the policy version of each output token (an int or one per token; weights may
    change during a call), default the manager's current version.

    A session the manager has not seen (an agent that skipped admission, a restarted one)
    is recorded as a new single-session group and counted in `stats["unknown_sessions"]`.
    Returns {"branch": index, "new_branch": bool, "mismatch": bool}; a call of an aborted
    group's session is not recorded (`stats["late_calls"]`; branch None).
    """
    prompt = [int(t) for t in prompt]
    output = [int(t) for t in output]
    if not prompt:
      raise ValueError(f"record({session!r}): empty prompt")
    with self._lock:
      version = self.version if version is None else version
      self.stats["calls"] += 1
      if session in self.dropped:
        self.stats["late_calls"] += 1
        return {"branch": None, "new_branch": False, "mismatch": False}
      sess = self.sessions.get(session)
      if sess is None:
        self.stats["unknown_sessions"] += 1
        gid = self._new_group_id()
        self.groups[gid] = [session]
        sess = self.sessions[session] = Session(task="", group=gid)
        self.running += 1
      if sess.reward is not None:
        raise ValueError(f"record({session!r}): the session has already finished")
      index, shared = _best_branch(sess.branches, prompt)
      if index is not None and shared == len(sess.branches[index].tokens):
        branch, new, mismatch = sess.branches[index], False, False
      else:
        # A fork (the prompt is a prefix of a branch: a retry, n > 1) or a mismatch (the
        # prompt differs from every branch before its own end: history was rewritten). The
        # shared prefix keeps its records but is trained only in the branch it came from.
        mismatch = bool(sess.branches) and shared < len(prompt)
        branch = (sess.branches[index].prefix(shared) if index is not None
                  else Branch([], [], [], [], []))
        branch.loss_mask = [0] * len(branch.loss_mask)
        sess.branches.append(branch)
        index, new = len(sess.branches) - 1, True
        self.stats["forks"] += bool(sess.branches[:-1]) and not mismatch
      self.stats["prefix_mismatches"] += mismatch
      branch.extend(prompt[len(branch.tokens):], trained=False, version=0)  # not generated
      branch.extend(output, trained=True, logprobs=logprobs, entropy=entropy, version=version)
      return {"branch": index, "new_branch": new, "mismatch": mismatch}

  def finish(self, session: str, reward: float, info: dict | None = None) -> None:
    """Attach the graded reward; a group whose sessions have all finished becomes ready.
    The grade of an aborted group's session is ignored (counted in `stats["late_calls"]`)."""
    with self._lock:
      if session in self.dropped:
        self.stats["late_calls"] += 1
        return
      sess = self._session(session)
      if sess.reward is not None:
        raise ValueError(f"finish({session!r}): the session has already finished")
      if not np.isfinite(reward):
        raise ValueError(f"finish({session!r}): reward must be finite, got {reward}")
      sess.reward, sess.info = float(reward), dict(info or {})
      self.running -= 1
      self._maybe_ready(sess.group)

  def abort(self, session: str) -> str:
    """An agent died mid-episode: drop its group (counted); returns the task to reschedule.

    A group is trained whole or not at all (its advantages are relative), so the finished
    siblings of a dead session are dropped too and the task is run again.
    """
    with self._lock:
      sess = self._session(session)
      self.stats["aborted"] += 1
      gid = sess.group
      for s in self.groups.pop(gid):
        other = self.sessions.pop(s)
        self.dropped.add(s)
        self.accepted -= 1
        if other.reward is None:
          self.running -= 1
      return sess.task

  # --- the trainer's side -----------------------------------------------------------------

  def num_ready(self) -> int:
    with self._lock:
      return len(self.ready)

  def take_batch(self) -> tuple[list[list[Trajectory]], dict] | None:
    """(groups, info) for batch_groups finished groups, or None while fewer are ready.

    groups: per task, one Trajectory per branch of each of its sessions. info: staleness
    (mean over trained tokens of current version - the version that generated the token)
    and max_staleness; version (the manager's, which the step trains at); lineage: per
    group {"id", "fingerprint" (`fingerprint` of its trajectories' tokens), "versions"
    ([min, max] version of its trained tokens)}, what a run logs to show which data each step
    consumed. The groups leave the buffer: each is trained exactly once.
    """
    with self._lock:
      if len(self.ready) < self.batch_groups:
        return None
      take, self.ready = self.ready[:self.batch_groups], self.ready[self.batch_groups:]
      groups, lags, lineage = [], [], []
      for gid in take:
        group, versions = [], []
        for s in self.groups.pop(gid):
          sess = self.sessions.pop(s)
          for b in sess.branches:
            versions += b.trained_versions()
            group.append(b.to_trajectory(sess.reward, gid))
        lags += [self.version - v for v in versions]
        groups.append(group)
        lineage.append({"id": gid, "fingerprint": fingerprint([t.tokens for t in group]),
                        "versions": [min(versions, default=0), max(versions, default=0)]})
      self.stats["trained_groups"] += len(take)
      info = {"staleness": float(np.mean(lags)) if lags else 0.0,
              "max_staleness": int(max(lags, default=0)), "version": self.version,
              "lineage": lineage}
      return groups, info

  def branches(self, session: str) -> list[Branch]:
    with self._lock:
      return list(self._session(session).branches)

  # --- checkpointing ----------------------------------------------------------------------

  def state_dict(self) -> dict:
    """Plain, JSON-serialisable state: sessions (with branches), groups, counters."""
    with self._lock:
      return {"version": self.version, "accepted": self.accepted, "running": self.running,
              "next_group": self.next_group,
              "ready": list(self.ready), "stats": dict(self.stats),
              "groups": {str(g): list(s) for g, s in self.groups.items()},
              "sessions": {k: {"task": s.task, "group": s.group, "reward": s.reward,
                               "info": s.info,
                               "branches": [dataclasses.asdict(b) for b in s.branches]}
                           for k, s in self.sessions.items()}}

  def load_state_dict(self, state: dict) -> None:
    with self._lock:
      self.version, self.accepted = int(state["version"]), int(state["accepted"])
      self.running, self.ready = int(state["running"]), [int(g) for g in state["ready"]]
      self.next_group = int(state["next_group"])
      self.stats = dict(state["stats"])
      self.groups = {int(g): list(s) for g, s in state["groups"].items()}
      self.sessions = {k: Session(task=v["task"], group=int(v["group"]), reward=v["reward"],
                                  info=v["info"], branches=[Branch(**b) for b in v["branches"]])
                       for k, v in state["sessions"].items()}

  # --- helpers ----------------------------------------------------------------------------

  def _can_admit(self, n: int) -> bool:
    if self.eta is None:
      return True
    return self.accepted + n <= (self.eta + self.version + 1) * self.batch_trajectories

  def _new_group_id(self) -> int:
    self.next_group += 1  # never reused: a group id names one task attempt for good
    return self.next_group - 1

  def _session(self, session: str) -> Session:
    sess = self.sessions.get(session)
    if sess is None:
      raise KeyError(f"unknown session {session!r}")
    return sess

  def _maybe_ready(self, gid: int) -> None:
    if all(self.sessions[s].reward is not None for s in self.groups[gid]):
      self.ready.append(gid)


class RecordingBackend:
  """Wraps a sampler-like backend (`generate(prompts, sampling, **kw)`) for one session.

  The in-process agent loop uses it in place of the sampler: every call is recorded with the
  ids the engine consumed and produced, and the policy version of each produced token (the
  completion's per-token `version`, else the engine's `version`), so the agent is unchanged.
  """

  def __init__(self, backend, manager: TrajectoryManager, session: str):
    self.backend, self.manager, self.session = backend, manager, session

  def generate(self, prompts, *args, **kwargs):
    outs = self.backend.generate(prompts, *args, **kwargs)
    for prompt, comps in zip(prompts, outs):
      for comp in comps:
        version = getattr(comp, "version", None)
        if version is None:
          version = getattr(self.backend, "version", None)
        self.manager.record(self.session, prompt, comp.tokens, comp.logprobs,
                            getattr(comp, "entropy", None),
                            version=version)
    return outs


def fingerprint(token_lists) -> int:
  """crc32 of a group's token ids (int32, each list length-prefixed): names its content."""
  crc = 0
  for tokens in token_lists:
    arr = np.asarray(tokens, np.int32)
    crc = zlib.crc32(np.int32(arr.size).tobytes() + arr.tobytes(), crc)
  return crc


def _best_branch(branches, prompt) -> tuple[int | None, int]:
  """(index, shared length) of the branch to continue from: the longest branch that the
  prompt extends whole, else the branch sharing the longest prefix with it (None, 0 if none)."""
  whole, best, best_len = None, None, 0
  for i, b in enumerate(branches):
    n = _common_prefix(b.tokens, prompt)
    if n == len(b.tokens) and (whole is None or n > len(branches[whole].tokens)):
      whole = i
    elif n > best_len:
      best, best_len = i, n
  if whole is not None:
    return whole, len(branches[whole].tokens)
  return best, best_len


def _common_prefix(a, b) -> int:
  n = min(len(a), len(b))
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if diff.size else n


def _floats(values, n) -> list:
  if values is None:
    return [0.0] * n
  arr = np.asarray(values, np.float32).reshape(-1)
  if arr.size != n:
    raise ValueError(f"per-token values have {arr.size} entries for {n} tokens")
  return [float(x) for x in arr]
