"""RFT deviation monitor (host side): end a rollout that keeps straying from the ground truth.

`DeviationMonitor` is built once per task from its ground truth (gold patch files, teacher
trajectories' generated token ids, the task's tool specs) and called once per finished
model turn, in order, with what the agent did in that turn. A turn is bad for a check when:

- files: it touched a file outside the gold patch (files the caller reports plus the `path`
  argument of the configured editing tools);
- similarity: the agent's generated ids so far are less similar than `min_similarity` to
  the prefix of the same length of every teacher (core `lcs_similarity` / `edit_similarity`);
- schema: one of its tool calls is malformed (unparsable, unknown tool, missing / unexpected
  arguments, wrong JSON type).

Each check counts its bad turns in a row (a good turn resets it); the monitor says stop when a
count reaches its patience and stays stopped. `Verdict.cut_turn` is the first turn of the
deviating streak: `truncate_after(rollout, rollout.turn_starts[cut_turn])` then masks those
turns' tokens (loss_mask = 0, tokens kept) so the deviation is neither rewarded nor punished
token by token, while the record still reproduces what the model saw.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import re

import jax
import numpy as np

from katjax.core import rft
from katjax.envs.base import ToolCall, check_tool_call

__all__ = ["DeviationConfig", "Verdict", "DeviationMonitor", "truncate_after",
           "patch_files", "generated_ids", "tool_call_problems"]

CHECKS = ("files", "similarity", "schema")


@dataclasses.dataclass(frozen=True)
class DeviationConfig:
  """When the monitor stops a rollout.

  patience: bad turns in a row (files, similarity) that stop it.
  schema_patience: turns in a row with a malformed tool call that stop it.
  min_similarity: similarity to the best teacher prefix below which a turn is bad
    (None: no similarity check).
  metric: "lcs" or "edit" (see katjax.core.rft).
  edit_tools: (tool name, path argument) pairs whose calls touch that path.
  """

  patience: int = 2
  schema_patience: int = 1
  min_similarity: float | None = 0.3
  metric: str = "lcs"
  edit_tools: tuple = (("edit", "path"),)

  def __post_init__(self):
    for name in ("patience", "schema_patience"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DeviationConfig.{name} must be an int >= 1, got {value!r}")
    s = self.min_similarity
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))
                          or not 0.0 <= s <= 1.0):
      raise ValueError(f"DeviationConfig.min_similarity must be None or a number in [0, 1], "
                       f"got {s!r}")
    if self.metric not in rft.METRICS:
      raise ValueError(f"DeviationConfig.metric must be one of {rft.METRICS}, got "
                       f"{self.metric!r}")
    if not all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(x, str) for x in p)
               for p in self.edit_tools):
      raise ValueError(f"DeviationConfig.edit_tools must be (tool name, path argument) "
                       f"string pairs, got {self.edit_tools!r}")


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The monitor's answer after a turn: stop or continue, why, and where the streak began."""

  stop: bool
  reason: str = ""
  check: str = ""  # "files" | "similarity" | "schema" when stopped
  cut_turn: int = -1  # first turn of the deviating streak when stopped
  similarity: float | None = None  # this turn's similarity to the best teacher prefix


class DeviationMonitor:
  """Per-rollout state; call `monitor(turn_calls, ...)` once per finished model turn.

  gold_files: paths the gold patch changes (empty: no file check).
  teacher_ids: one int array per teacher trajectory, its generated tokens only.
  tools: the task's OpenAI tool specs (empty: no schema check).
  """

  def __init__(self, gold_files=(), teacher_ids=(), tools=(),
               config: DeviationConfig = DeviationConfig()):
    if not isinstance(config, DeviationConfig):
      raise ValueError(f"config must be a DeviationConfig, got {type(config).__name__}")
    self.config = config
    self.gold_files = frozenset(_norm_path(p) for p in gold_files)
    self.teachers = [np.asarray(t) for t in teacher_ids]
    for i, t in enumerate(self.teachers):
      if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"teacher_ids[{i}] must be a 1-D integer array, got "
                         f"{t.dtype}{t.shape}")
    self.tools = {t["function"]["name"]: t["function"] for t in tools}
    self.turn = 0
    self.verdict = Verdict(stop=False)
    self.history: list[dict] = []  # per turn: the three checks' outcomes, for logging
    self._streak = dict.fromkeys(CHECKS, 0)

  @classmethod
  def from_swe_task(cls, task: dict, tools, teacher_ids=(),
                    config: DeviationConfig = DeviationConfig()):
    """A monitor whose gold files are those of the task's gold `patch` (SWE-bench fields)."""
    return cls(patch_files(task.get("patch", "")), teacher_ids, tools, config)

  def __call__(self, tool_calls=(), files_touched=(), generated=None,
               malformed: int = 0) -> Verdict:
    """Judges one finished turn and returns the verdict (sticky once it says stop).

    tool_calls: the turn's parsed `ToolCall`s (or OpenAI-style dicts); files_touched: other
    paths the caller knows the turn changed; generated: all ids the agent generated so far
    (None: no similarity check this turn); malformed: tool-call blocks the parser rejected.
    """
    if self.verdict.stop:
      return self.verdict
    calls = [c if isinstance(c, ToolCall) else ToolCall.from_openai(c) for c in tool_calls]
    outside = self._files_outside(calls, files_touched)
    problems = (tool_call_problems(calls, self.tools) if self.tools else []) \
        + [f"malformed tool call ({malformed})"] * bool(malformed)
    similarity = self._similarity(generated)
    low = similarity is not None and similarity < self.config.min_similarity
    bad = {"files": bool(outside), "similarity": low, "schema": bool(problems)}
    for check in CHECKS:
      self._streak[check] = self._streak[check] + 1 if bad[check] else 0
    self.history.append({"turn": self.turn, "similarity": similarity, "outside": outside,
                         "problems": problems})
    self.turn += 1
    detail = {"files": f"touched files outside the gold patch: {outside}",
              "similarity": f"similarity to the teacher prefix {similarity} < "
                            f"{self.config.min_similarity}",
              "schema": f"invalid tool calls: {problems}"}
    for check in ("schema", "files", "similarity"):
      patience = self.config.schema_patience if check == "schema" else self.config.patience
      if self._streak[check] >= patience:
        self.verdict = Verdict(stop=True, check=check, similarity=similarity,
                               cut_turn=self.turn - self._streak[check],
                               reason=f"{detail[check]} ({self._streak[check]} turns in a row)")
        return self.verdict
    return Verdict(stop=False, similarity=similarity)

  def _files_outside(self, calls, files_touched):
    if not self.gold_files:
      return []
    edit_args = dict(self.config.edit_tools)
    touched = [str(p) for p in files_touched]
    touched += [str(c.arguments[edit_args[c.name]]) for c in calls
                if c.name in edit_args and isinstance(c.arguments, dict)
                and edit_args[c.name] in c.arguments]
    return sorted({_norm_path(p) for p in touched} - self.gold_files)

  def _similarity(self, generated):
    if generated is None or not self.teachers or self.config.min_similarity is None:
      return None
    ids = np.asarray(generated)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"generated must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    n = ids.size
    # Compare with each teacher's prefix of the same length (the whole teacher if shorter);
    # pad to a power of two so a rollout compiles O(log T) shapes, not one per turn.
    size = _bucket(n)
    prefixes = [t[:n] for t in self.teachers]
    truths = np.zeros((len(prefixes), size), np.int32)
    for i, p in enumerate(prefixes):
      truths[i, :p.size] = p
    rollout = np.zeros((1, size), np.int32)
    rollout[0, :n] = ids
    sims = _similarity_matrix(self.config.metric)(
        rollout, np.array([n], np.int32), truths, np.array([p.size for p in prefixes], np.int32))
    return float(np.max(sims))


def truncate_after(record, cut_index: int):
  """Masks every token from `cut_index` on (loss_mask = 0), keeping the tokens.

  record: a `Rollout`, a `katjax.core.tree.Trajectory` (a copy is returned, the input is left
  unchanged) or a loss mask array (a masked copy is returned). cut_index in [0, T]; T masks
  nothing.
  """
  mask = record if isinstance(record, np.ndarray) else getattr(record, "loss_mask", None)
  if mask is None:
    raise ValueError(f"truncate_after needs a Rollout, a Trajectory or a loss mask array, got "
                     f"{type(record).__name__}")
  mask = np.asarray(mask)
  if mask.ndim != 1:
    raise ValueError(f"loss_mask must be 1-D, got shape {mask.shape}")
  if isinstance(cut_index, bool) or not isinstance(cut_index, (int, np.integer)) \
      or not 0 <= cut_index <= mask.size:
    raise ValueError(f"cut_index must be an int in [0, {mask.size}], got {cut_index!r}")
  masked = mask.copy()
  masked[int(cut_index):] = 0
  if isinstance(record, np.ndarray):
    return masked
  return dataclasses.replace(record, loss_mask=masked)


def patch_files(diff: str) -> list[str]:
  """Paths a unified git diff changes (both sides of a rename; /dev/null skipped)."""
  paths = []
  for m in re.finditer(r"^(?:---|\+\+\+) (?:[ab]/)?(\S+)", diff, re.M):
    if m.group(1) != "/dev/null" and m.group(1) not in paths:
      paths.append(m.group(1))
  return paths


def generated_ids(tokens, loss_mask) -> np.ndarray:
  """int32[G]: the generated tokens of a record (where loss_mask is 1), e.g. a teacher's."""
  tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
  if tokens.shape != loss_mask.shape or tokens.ndim != 1:
    raise ValueError(f"tokens and loss_mask must be 1-D of one shape, got {tokens.shape} and "
                     f"{loss_mask.shape}")
  return tokens[loss_mask.astype(bool)].astype(np.int32)


def tool_call_problems(calls, tools: dict) -> list[str]:
  """What is wrong with each call against the tool specs {name: function spec} ([] if fine):
  `katjax.envs.base.check_tool_call`, argument types included."""
  return [p for p in (check_tool_call(c, tools, types=True) for c in calls) if p]


# --- helpers -----------------------------------------------------------------------------------


def _norm_path(path: str) -> str:
  p = posixpath.normpath(str(path).strip())
  return p[2:] if p.startswith("./") else p


def _bucket(n: int) -> int:
  return max(16, 1 << max(n - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _similarity_matrix(metric):
  return jax.jit(functools.partial(rft.similarity_matrix, metric=metric))
