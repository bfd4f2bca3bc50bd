"""Reading JSONL datasets: one JSON object per line, bad lines reported with file:line.

`on_error="skip"` logs each bad line (file:line: reason) and counts it; `"raise"` stops at
the first one with a ValueError. Nothing is dropped silently. `write_jsonl` writes one
atomically, so several hosts (or a killed run) never leave a reader a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import logging

ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: str, *, validate=None, on_error: str = "skip"):
  """-> (records: list[dict], errors: list[str]). `validate(record)` raises ValueError."""
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
  if not os.path.exists(path):
    raise ValueError(f"dataset file not found: {path}")
  records, errors = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        if validate is not None:
          validate(record)
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        msg = f"{path}:{lineno}: {e}"
        if on_error == "raise":
          raise ValueError(f"bad record at {msg}") from e
        logging.warning("skipping bad record at %s", msg)
        errors.append(msg)
        continue
      records.append(record)
  if not records:
    raise ValueError(f"empty dataset: no valid records in {path} "
                     f"({len(errors)} bad line(s))")
  return records, errors


def write_jsonl(path: str, records) -> str:
  """Write records (dicts) as JSONL at `path`, complete or not at all; returns `path`.

  Each writer fills its own temporary file beside `path` and renames it over `path`: hosts
  sharing a workdir may all write the same (deterministic) data at once, and a reader sees
  one whole file, never a mix or a truncated one.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def validate_text(record: dict) -> None:
  """A mid-training document: {"text": str}."""
  if not isinstance(record.get("text"), str):
    raise ValueError('a document needs a string field "text"')


def validate_chat(record: dict) -> None:
  """A chat: {"messages": [{"role", "content", ...}], "tools": [...] (optional)}."""
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    raise ValueError('a chat needs a non-empty list field "messages"')
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"messages[{i}] is not an object")
    if m.get("role") not in ROLES:
      raise ValueError(f"messages[{i}] has unknown role {m.get('role')!r}; expected one of "
                       f"{list(ROLES)}")
    content = m.get("content")
    if content is not None and not isinstance(content, str):
      raise ValueError(f"messages[{i}].content must be a string or null")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError("chat has no assistant message (nothing to train on)")
  tools = record.get("tools")
  if tools is not None and not isinstance(tools, list):
    raise ValueError('"tools" must be a list of function specs')
