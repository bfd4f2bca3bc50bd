"""Stage 3: RFT, RL guided by ground-truth trajectories (DESIGN.md section 4).

The RL loop of `katjax.stages.rl` with three changes, all driven by each task's teacher
trajectory (`task["teacher"]`: the assistant / tool messages that follow the prompt; the
arithmetic environment gets one derived from the answer when absent):

- reward: relative to the ground truth, `(1 - w) * max_k sim(o, g_k) + w * outcome` with
  `sim` the jit token-LCS (or edit) similarity of the generated tokens (`katjax.core.rft`)
  and `outcome` the environment's reward; GRPO within the group;
- early termination: a `DeviationMonitor` per rollout ends a rollout whose generated tokens
  keep drifting from the teacher's prefix or whose tool calls break the schema; the tokens of
  the deviating turns stay in the record but leave the loss;
- the teacher joins the group as an off-policy branch of the same prefix tree (reward 1: it
  is the ground truth), so the shared prompt is computed once for rollouts and teacher.
"""

from __future__ import annotations

import json

import numpy as np

from katjax.core.rft import RelativeRewardConfig, relative_reward, similarity_matrix
from katjax.core.tree import Trajectory
from katjax.envs.base import make_env
from katjax.parallel import is_main_process
from katjax.rollout.deviation import DeviationConfig, DeviationMonitor
from katjax.stages import rl as rl_stage
from katjax.stages.common import make_tokenizer
from katjax.train.config import RFTConfig, parse, section


def run(config, workdir: str) -> dict:
  rl = parse(config).rl
  rewards = RftRewards(make_tokenizer(config, workdir), rl.env, rl.rft)
  summary = rl_stage.train_rl(config, workdir, rft=rewards)
  r = summary["reward_mean"]
  if is_main_process():
    print(f"rft: steps {summary['start_step']}->{summary['steps']}, mean reward first/last "
          f"{r[min(r)] if r else None} / {r[max(r)] if r else None}, workdir {workdir}")
  return summary


def arithmetic_teacher(task: dict) -> list[dict]:
  """The ground truth of an arithmetic task: one turn that submits the answer."""
  args = json.dumps({"answer": str(task["answer"])})
  return [{"role": "assistant", "content": "", "tool_calls": [
      {"id": "call_teacher", "type": "function",
       "function": {"name": "submit", "arguments": args}}]}]


class RftRewards:
  """Ground-truth side of RFT for one environment: monitors, rewards, teacher branches."""

  def __init__(self, tokenizer, env_name: str, rft_cfg: RFTConfig):
    rft_cfg = section(RFTConfig, rft_cfg, "config.rl.rft")  # also accepts a dict
    self.tokenizer, self.env_name = tokenizer, env_name
    self.metric = rft_cfg.metric
    self.reward_cfg = RelativeRewardConfig(mode="max_similarity",
                                           outcome_weight=rft_cfg.outcome_weight)
    self.monitor_cfg = (DeviationConfig(patience=rft_cfg.patience,
                                        schema_patience=rft_cfg.schema_patience,
                                        min_similarity=rft_cfg.min_similarity,
                                        metric=rft_cfg.metric)
                        if rft_cfg.monitor else None)
    self.teacher_branch = rft_cfg.teacher_branch
    self._truths = {}

  def _truth(self, task: dict):
    """(teacher Trajectory, teacher's generated ids, tool specs), cached per task."""
    key = task.get("id") or json.dumps(task, sort_keys=True, default=str)
    if key not in self._truths:
      with make_env(self.env_name) as env:
        messages, tools = env.reset(task)
      teacher = task.get("teacher")
      if teacher is None:
        if self.env_name != "arithmetic":
          raise ValueError(f"RFT task {key!r} has no 'teacher' messages (the ground-truth "
                           f"trajectory after the prompt)")
        teacher = arithmetic_teacher(task)
      ids, mask = self.tokenizer.encode_chat(list(messages) + list(teacher), tools)
      if not mask.any():
        raise ValueError(f"RFT task {key!r}: the teacher messages contain no assistant turn")
      traj = Trajectory(tokens=ids, loss_mask=mask)
      self._truths[key] = (traj, ids[mask.astype(bool)], tools)
    return self._truths[key]

  def teacher(self, task: dict) -> Trajectory | None:
    return self._truth(task)[0] if self.teacher_branch else None

  def monitor(self, task: dict) -> DeviationMonitor | None:
    if self.monitor_cfg is None:
      return None
    _, teacher_ids, tools = self._truth(task)
    return DeviationMonitor(teacher_ids=[teacher_ids], tools=tools, config=self.monitor_cfg)

  def rewards(self, task: dict, rollouts) -> np.ndarray:
    """float64[N]: relative reward of each rollout's generated tokens vs the teacher's."""
    _, teacher_ids, _ = self._truth(task)
    generated = [np.concatenate([r.tokens[s:e] for s, e in zip(r.turn_starts, r.turn_ends)]
                                + [np.zeros(0, np.int32)]) for r in rollouts]
    width = max([len(teacher_ids), 1] + [len(g) for g in generated])
    padded = np.zeros((len(generated), width), np.int32)
    for i, g in enumerate(generated):
      padded[i, :len(g)] = g
    truth = np.zeros((1, width), np.int32)
    truth[0, :len(teacher_ids)] = teacher_ids
    sims = similarity_matrix(padded, np.asarray([len(g) for g in generated], np.int32),
                             truth, np.asarray([len(teacher_ids)], np.int32), self.metric)
    outcome = np.asarray([r.reward for r in rollouts], np.float32)
    return np.asarray(relative_reward(sims, self.reward_cfg, outcome=outcome), np.float64)
