"""The lookup environment: answers hide in a per-task random table behind a tool.

Task (katjax.data.lookup.generate_tasks): {"level", "keys", "table", "answer"}. Tools:
`lookup(key)` returns the table entry (a two-digit value, or for chain tasks another key),
`submit(answer)` ends the episode. Reward 1.0 iff the submitted values, split on
commas, equal the task's answer list in order. The table is never in the prompt, so the
only way to the answer is through the tool; independent look-ups may go in one turn.
"""

from __future__ import annotations

from katjax.data.lookup import SYSTEM_PROMPT, question, tool_specs
from katjax.envs.base import Environment, ToolError, register_env

__all__ = ["LookupEnv"]


@register_env("lookup")
class LookupEnv(Environment):
  """In-memory table env; tools `lookup` and `submit`."""

  def __init__(self):
    super().__init__()
    self.task: dict | None = None
    self.submitted: str | None = None
    self.num_lookups = 0

  def reset(self, task: dict):
    missing = [k for k in ("level", "keys", "table", "answer") if k not in task]
    if missing:
      raise ValueError(f"lookup task {task.get('id')!r} is missing fields {missing}")
    self.task, self.submitted, self.done, self.num_lookups = task, None, False, 0
    self.tools = tool_specs()  # for the argument checks of `step`
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question(task)}]
    # The prompt names the tools in its system line instead of the chat template's tool
    # block (~190 constant tokens): a tiny model's attention starts uniform over the
    # context, and each constant token dilutes the gradient that teaches it to attend to
    # the key it must copy. With the block, SFT stays at chance on every copied token
    # (docs/pipeline.md); a 20-token prompt is what lets the stages learn.
    return messages, []

  def tool_lookup(self, key) -> str:
    self.num_lookups += 1
    key = str(key).strip()
    if key not in self.task["table"]:
      raise ToolError(f"no key {key!r}")
    return self.task["table"][key]

  def tool_submit(self, answer) -> str:
    if self.done:
      raise ToolError("already submitted")
    self.submitted, self.done = str(answer), True
    return "Submitted."

  def evaluate(self):
    if self.task is None:
      raise ValueError("evaluate() called before reset()")
    got = ([v.strip() for v in self.submitted.split(",")] if self.submitted is not None
           else None)
    correct = got == list(self.task["answer"])
    return float(correct), {"submitted": self.submitted, "answer": self.task["answer"],
                            "level": self.task["level"], "lookups": self.num_lookups}
