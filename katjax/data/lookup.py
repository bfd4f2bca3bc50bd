"""The lookup task family: tasks, held-out split, mid corpus, expert and teacher episodes.

Every task hides a small random table behind the `lookup` tool (katjax.envs.lookup); the
answer is a list of table values the model cannot guess (two-digit numbers, 1/90 each), so
multi-turn tool use is necessary. Four levels make progress visible stage by stage:

  level 1  "get:ka"         one look-up, then submit                     optimum 2 turns
  level 2  "get:ka,mo"      two independent look-ups (parallel: 1 turn)  optimum 2 turns
  level 3  "chain:ka"       ka -> another key -> value (serial by need)   optimum 3 turns
  level 4  "get:ka,mo,zu"   three independent look-ups                   optimum 2 turns

With the pipeline's turn limit of 3, level 4 done one call per turn (4 turns) fails: only
parallel calls solve it. The data for each stage:

- `mid_corpus`: tool docs, rendered prompts, rendered single calls and single results, and
  copy drills (a question then its look-ups; results then their submit), in the chat
  format, but never a solved episode (format, vocabulary and copying, not the protocol);
- `expert_episode`: a scripted demonstrator with human-like imperfections: independent
  look-ups go one per turn unless `parallel` (drawn per episode), and most episodes
  re-check their first look-up in a turn of their own; this is SFT's data;
- `teacher_episode`: the optimum (all independent look-ups in one turn, shortest), RFT's
  ground truth.

Held-out split by construction: a task's split is a hash of its content (level, keys and
table), so the train and held-out generators can never produce the same task whatever
their seeds; `check_disjoint` verifies any given pair of task lists.
"""

from __future__ import annotations

import hashlib
import json
import random

__all__ = ["KEYS", "LEVELS", "SYSTEM_PROMPT", "generate_tasks", "task_split", "fingerprint",
           "check_disjoint", "expert_episode", "teacher_episode", "mid_corpus", "tool_specs",
           "question"]

# Two-letter keys (consonant + vowel): 75 of them, each a single BPE token after training.
KEYS = tuple(c + v for c in "bdfgklmnprstvzh" for v in "aeiou")
LEVELS = (1, 2, 3, 4)
HELDOUT_SHARE = 4  # one task in HELDOUT_SHARE (by content hash) is held out
SYSTEM_PROMPT = ("Tools: lookup(key) returns a key's value; submit(answer) ends the task. "
                 "Look up the keys asked, then submit their values in order.")


def tool_specs() -> list[dict]:
  """The two tools, with short descriptions (they are in every prompt). OpenAI function
  schemas as `katjax.envs.base.tool_spec` writes them (data/ sits below envs/)."""
  def spec(name, description, arg):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {arg: {"type": "string"}},
                       "required": [arg]}}}
  return [spec("lookup", "Value of a key.", "key"), spec("submit", "Submit the values.", "answer")]


def question(task: dict) -> str:
  verb = "chain" if task["level"] == 3 else "get"
  # No spaces: a key (and a value) is then the same BPE pre-token in the question, in the
  # call's JSON and in the tool result, so copying it is copying identical tokens.
  return f"{verb}:{','.join(task['keys'])}"


def generate_tasks(n: int, split: str = "train", seed: int = 0,
                   levels: tuple[int, ...] = LEVELS) -> list[dict]:
  """n tasks of `split` ("train" | "heldout"), levels cycling through `levels`.

  Each task: {"id", "level", "keys", "table": {key: value-or-key}, "answer": [str]}.
  Deterministic for (split, seed); draws are rejected until the content hash puts the task
  in `split`, so the splits are disjoint by construction.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  for lvl in levels:
    if lvl not in LEVELS:
      raise ValueError(f"levels: unknown level {lvl!r}; known {LEVELS}")
  rng = random.Random(f"lookup:{split}:{seed}")
  tasks = []
  while len(tasks) < n:
    level = levels[len(tasks) % len(levels)]
    task = _draw(rng, level)
    if task_split(task) == split:
      task["id"] = f"lookup-{split}-{seed}-{len(tasks)}"
      tasks.append(task)
  return tasks


def fingerprint(task: dict) -> str:
  """Content hash of a task (level, keys, table); ids and derived fields do not count."""
  body = json.dumps([task["level"], list(task["keys"]), sorted(task["table"].items())])
  return hashlib.sha1(body.encode()).hexdigest()


def task_split(task: dict) -> str:
  return "heldout" if int(fingerprint(task)[:8], 16) % HELDOUT_SHARE == 0 else "train"


def check_disjoint(eval_tasks: list[dict], train_tasks: list[dict], what: str = "eval") -> None:
  """ValueError naming the tasks when an evaluation task also occurs in training data
  (same content) or is not of the held-out split."""
  seen = {fingerprint(t): t.get("id") for t in train_tasks}
  shared = [(t.get("id"), seen[fingerprint(t)]) for t in eval_tasks if fingerprint(t) in seen]
  if shared:
    raise ValueError(f"{what} split overlaps the training data: {len(shared)} task(s) occur "
                     f"in both, e.g. {shared[:3]} (eval id, train id)")
  not_held = [t.get("id") for t in eval_tasks if task_split(t) != "heldout"]
  if not_held:
    raise ValueError(f"{what} split has {len(not_held)} task(s) outside the held-out split "
                     f"(they could be drawn for training), e.g. {not_held[:3]}")


def expert_episode(task: dict, rng: random.Random, parallel_prob: float = 0.3,
                   recheck_prob: float = 0.7) -> list[dict]:
  """Scripted demonstration (assistant and tool messages after the prompt), imperfect the
  way a cautious human is: independent look-ups go in one turn only with probability
  `parallel_prob` (else one per turn), and with probability `recheck_prob` the first
  look-up is repeated in a turn of its own before going on ("let me check that again").

  The re-check is harmless within 3 turns except on chains (3 turns at best, 4 with it),
  so a policy that imitates the demonstrator's most likely behaviour fails the chains,
  while one that samples it still solves them 1 - recheck_prob of the time: the room RFT
  and RL have above SFT (docs/pipeline.md)."""
  turns = _plan(task, parallel=rng.random() < parallel_prob)
  if rng.random() < recheck_prob:
    turns.insert(1, [turns[0][0]])
  return _render(task, turns)


def teacher_episode(task: dict) -> list[dict]:
  """The optimal episode: all independent look-ups in one turn, then submit."""
  return _render(task, _plan(task, parallel=True))


def mid_corpus(n_docs: int, seed: int = 0) -> list[str]:
  """Documents for mid-training, rendered in the chat format, without solved episodes.

  Each document is one of: the tool docs; a task prompt (system + user, no answer); an
  assistant turn with look-ups of random keys (one or several); a user turn of tool
  results; a submit call with random values; and half of them copy drills: a question
  followed by the look-ups of its keys (no result, no answer), or tool results followed by
  the call that uses them (the submit of those values, or the look-up of a returned key).

  The drills are there because copying is what a tiny model cannot find on its own: SFT
  from a corpus without them learns the protocol but stays at chance on every copied
  token (docs/pipeline.md), like a language model without induction heads. Pretraining
  gives real models that skill; the drills give it here. No document holds a question and
  its answer, so mid-training still cannot solve a task.
  """
  from katjax.model.tokenizer import ByteTokenizer
  tok = ByteTokenizer()  # only its chat rendering (text), not its ids
  rng = random.Random(f"lookup-mid:{seed}")
  tools = tool_specs()
  docs = []
  for i in range(n_docs):
    kind = i % 10
    if kind == 0:
      docs.append("Tools: lookup(key) returns the value of key in the task's table, or "
                  "another key to look up. submit(answer) ends the task; answer is the "
                  "values separated by commas, in the order asked. Several lookup calls "
                  "can go in one turn.\n" + json.dumps(tools))
    elif kind == 1:
      task = _draw(rng, rng.choice(LEVELS))
      while task_split(task) != "train":  # not even a held-out task's question is seen
        task = _draw(rng, task["level"])
      msgs = [{"role": "system", "content": SYSTEM_PROMPT},
              {"role": "user", "content": question(task)}]
      docs.append(tok.render_chat(msgs))
    elif kind == 2:
      keys = rng.sample(KEYS, rng.randint(1, 3))
      calls = [_call("lookup", {"key": k}, j) for j, k in enumerate(keys)]
      docs.append(tok.render_chat([{"role": "assistant", "content": "", "tool_calls": calls}]))
    elif kind == 3:
      n = rng.randint(1, 3)
      msgs = [{"role": "tool", "tool_call_id": f"c{j}", "content": _value_or_key(rng)}
              for j in range(n)]
      docs.append(tok.render_chat(msgs))
    elif kind == 4:
      answer = ",".join(str(rng.randint(10, 99)) for _ in range(rng.randint(1, 3)))
      docs.append(tok.render_chat([{"role": "assistant", "content": "",
                                    "tool_calls": [_call("submit", {"answer": answer}, 0)]}]))
    elif kind <= 7:
      docs.append(tok.render_chat(_question_drill(rng)))
    else:
      docs.append(tok.render_chat(_result_drill(rng)))
  return docs


def _question_drill(rng) -> list[dict]:
  """A training-split question, then one assistant turn looking up its (first) keys."""
  task = _draw(rng, rng.choice(LEVELS))
  while task_split(task) != "train":
    task = _draw(rng, task["level"])
  calls = [_call("lookup", {"key": k}, j) for j, k in enumerate(task["keys"])]
  return [{"role": "user", "content": question(task)},
          {"role": "assistant", "content": "", "tool_calls": calls}]


def _result_drill(rng) -> list[dict]:
  """Tool results, then the call that uses them: the submit of the values in order, or the
  look-up of a key that a result returned (the second hop of a chain)."""
  if rng.random() < 0.25:
    hop = rng.choice(KEYS)
    return [{"role": "tool", "tool_call_id": "c0", "content": hop},
            {"role": "assistant", "content": "", "tool_calls": [_call("lookup", {"key": hop}, 0)]}]
  values = [str(rng.randint(10, 99)) for _ in range(rng.randint(1, 3))]
  results = [{"role": "tool", "tool_call_id": f"c{j}", "content": v} for j, v in enumerate(values)]
  return results + [{"role": "assistant", "content": "",
                     "tool_calls": [_call("submit", {"answer": ",".join(values)}, 0)]}]


# --- helpers ----------------------------------------------------------------------------------


def _draw(rng: random.Random, level: int) -> dict:
  n_keys = {1: 1, 2: 2, 3: 1, 4: 3}[level]
  keys = rng.sample(KEYS, n_keys + (1 if level == 3 else 0))
  table = {}
  if level == 3:
    start, hop = keys
    keys = [start]
    table[start] = hop
    table[hop] = str(rng.randint(10, 99))
    answer = [table[hop]]
  else:
    for k in keys:
      table[k] = str(rng.randint(10, 99))
    answer = [table[k] for k in keys]
  return {"level": level, "keys": keys, "table": table, "answer": answer}


def _plan(task: dict, parallel: bool) -> list[list[tuple]]:
  """Turns of calls: [("lookup", key) | ("submit", answer)]."""
  if task["level"] == 3:
    turns = [[("lookup", task["keys"][0])], [("lookup", task["table"][task["keys"][0]])]]
  elif parallel:
    turns = [[("lookup", k) for k in task["keys"]]]
  else:
    turns = [[("lookup", k)] for k in task["keys"]]
  return turns + [[("submit", ",".join(task["answer"]))]]


def _render(task: dict, turns: list[list[tuple]]) -> list[dict]:
  msgs, n = [], 0
  for turn in turns:
    calls = []
    for name, arg in turn:
      calls.append(_call(name, {"key": arg} if name == "lookup" else {"answer": arg}, n))
      n += 1
    msgs.append({"role": "assistant", "content": "", "tool_calls": calls})
    for call, (name, arg) in zip(calls, turn):
      result = task["table"].get(arg, "") if name == "lookup" else "Submitted."
      msgs.append({"role": "tool", "tool_call_id": call["id"], "content": result})
  return msgs


def _call(name: str, arguments: dict, j: int) -> dict:
  return {"id": f"call_{j}", "type": "function",
          "function": {"name": name, "arguments": json.dumps(arguments)}}


def _value_or_key(rng):
  return rng.choice(KEYS) if rng.random() < 0.3 else str(rng.randint(10, 99))
