"""Tokenizers with the Qwen/Hermes chat template, tool calls and an assistant loss mask.

Two implementations share one interface (`vocab_size`, `eos_id`, `pad_id`, `stop_ids`,
`encode`, `decode`, `render_chat`, `encode_chat`, `parse_tool_calls`):

- `Tokenizer` wraps a Hugging Face `tokenizers` tokenizer.json (Qwen, SmolLM2, Llama ...).
- `ByteTokenizer` needs nothing: ids 0-255 are bytes, the chat special tokens come after,
  so tests and the demo run with tiny models.

The chat template is Qwen3's (Hermes tool format) without the thinking block:
`<|im_start|>role\\ncontent<|im_end|>\\n` per turn, tools listed in the system turn, tool
calls as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (several per turn),
consecutive `tool` messages folded into one user turn of `<tool_response>` blocks.
`encode_chat` tokenizes the whole rendered string once (so ids equal `encode(render_chat())`)
and marks with 1 exactly the tokens that start inside an assistant turn's body, the
closing `<|im_end|>` included; the `<|im_start|>assistant\\n` header is prompt.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
BYTE_SPECIALS = (IM_START, IM_END, END_OF_TEXT, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

_TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user "
                 "query.\n\nYou are provided with function signatures within <tools></tools> "
                 "XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function "
                 "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                 "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
_ROLES = ("system", "user", "assistant", "tool")
_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)


class _ChatTokenizer:
  """Chat template, loss mask and tool-call parsing over `_encode_with_starts`."""

  vocab_size: int
  eos_id: int
  pad_id: int
  stop_ids: tuple

  def encode(self, text: str) -> list[int]:
    """text -> token ids (special-token strings in the text become their special ids)."""
    return self._encode_with_starts(_check_text(text))[0]

  def render_chat(self, messages, tools=None, add_generation_prompt=False) -> str:
    """OpenAI-style messages (+ function tool specs) -> the prompt string."""
    return "".join(text for text, _ in self._chat_pieces(messages, tools,
                                                          add_generation_prompt))

  def encode_chat(self, messages, tools=None, add_generation_prompt=False):
    """messages -> (ids int32[T], loss_mask int32[T]); mask 1 on assistant-generated tokens."""
    pieces = self._chat_pieces(messages, tools, add_generation_prompt)
    text = "".join(t for t, _ in pieces)
    trained = np.zeros(len(text) + 1, bool)
    pos = 0
    for piece, train in pieces:
      trained[pos:pos + len(piece)] = train
      pos += len(piece)
    ids, starts = self._encode_with_starts(text)
    mask = trained[np.asarray(starts, np.int64)] if ids else np.zeros(0, bool)
    return np.asarray(ids, np.int32), mask.astype(np.int32)

  def parse_tool_calls(self, text: str):
    """Generated text -> (content, [dict(name, arguments)], [error strings]).

    Never raises on model output: a block that is not JSON, lacks a string "name" or has
    non-object "arguments" becomes an error entry; an unterminated block too.
    """
    text = _check_text(text)
    for stop in (IM_END, END_OF_TEXT):
      if text.endswith(stop):
        text = text[:-len(stop)]
    calls, errors, content = [], [], []
    pos = 0
    for m in _CALL_RE.finditer(text):
      content.append(text[pos:m.start()])
      pos = m.end()
      call, err = _parse_call(m.group(1))
      if err:
        errors.append(err)
      else:
        calls.append(call)
    rest = text[pos:]
    cut = rest.find(TOOL_CALL_OPEN)
    if cut >= 0:
      errors.append(f"unterminated {TOOL_CALL_OPEN} block: {rest[cut:cut + 80]!r}")
      rest = rest[:cut]
    content.append(rest)
    return "".join(content).strip(), calls, errors

  # --- template ---------------------------------------------------------------------------

  def _chat_pieces(self, messages, tools, add_generation_prompt):
    """[(text, trained)] pieces whose concatenation is the rendered conversation."""
    _check_messages(messages)
    out = []
    first_system = bool(messages) and messages[0]["role"] == "system"
    if tools:
      tool_lines = "".join("\n" + _tojson(_check_tool(t)) for t in tools)
      system = messages[0]["content"] + "\n\n" if first_system else ""
      out.append((f"{IM_START}system\n{system}{_TOOLS_HEADER}{tool_lines}{_TOOLS_FOOTER}"
                  f"{IM_END}\n", False))
    elif first_system:
      out.append((f"{IM_START}system\n{messages[0]['content']}{IM_END}\n", False))
    for i, msg in enumerate(messages):
      role = msg["role"]
      if i == 0 and role == "system":
        continue
      if role in ("user", "system"):
        out.append((f"{IM_START}{role}\n{msg['content']}{IM_END}\n", False))
      elif role == "assistant":
        out.append((f"{IM_START}assistant\n", False))
        out.append((_assistant_body(msg) + IM_END, True))
        out.append(("\n", False))
      else:  # tool: consecutive results share one user turn
        prev_tool = i > 0 and messages[i - 1]["role"] == "tool"
        next_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
        text = "" if prev_tool else f"{IM_START}user"
        text += f"\n<tool_response>\n{msg['content']}\n</tool_response>"
        out.append((text + ("" if next_tool else f"{IM_END}\n"), False))
    if add_generation_prompt:
      out.append((f"{IM_START}assistant\n", False))
    return out


class Tokenizer(_ChatTokenizer):
  """A Hugging Face `tokenizers.Tokenizer` with the chat interface."""

  def __init__(self, hf_tokenizer, eos_token: str | None = None, pad_token: str | None = None):
    self.hf = hf_tokenizer
    self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
    self.eos_id = _pick_id(vocab, eos_token, (IM_END, END_OF_TEXT, "<|eot_id|>", "</s>"), "eos")
    self.pad_id = _pick_id(vocab, pad_token, (END_OF_TEXT, "<|finetune_right_pad_id|>",
                                              "<pad>"), "pad", default=self.eos_id)
    stops = [vocab[t] for t in (IM_END, END_OF_TEXT, "<|eot_id|>") if t in vocab]
    self.stop_ids = tuple(dict.fromkeys([self.eos_id] + stops))

  @classmethod
  def from_file(cls, path, eos_token: str | None = None, pad_token: str | None = None):
    """Load a tokenizer.json (or a folder holding one)."""
    import tokenizers

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file not found: {path}")
    try:
      hf = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust error says what is wrong with the JSON
      raise ValueError(f"cannot read tokenizer {path}: {e}") from e
    return cls(hf, eos_token=eos_token, pad_token=pad_token)

  def decode(self, ids) -> str:
    """token ids -> text (special tokens kept as their strings)."""
    ids = _check_ids(ids, self.vocab_size)
    return self.hf.decode(ids, skip_special_tokens=False)

  def _encode_with_starts(self, text):
    enc = self.hf.encode(text, add_special_tokens=False)
    return list(enc.ids), [start for start, _ in enc.offsets]


class ByteTokenizer(_ChatTokenizer):
  """Dependency-free: ids 0-255 are UTF-8 bytes, then the chat specials (vocab 272)."""

  def __init__(self, vocab_size: int = 272):
    if vocab_size < 256 + len(BYTE_SPECIALS):
      raise ValueError(f"ByteTokenizer vocab_size must be >= {256 + len(BYTE_SPECIALS)}, "
                       f"got {vocab_size}")
    self.vocab_size = vocab_size
    self.special_ids = {tok: 256 + i for i, tok in enumerate(BYTE_SPECIALS)}
    self._special_strings = {i: tok for tok, i in self.special_ids.items()}
    self.eos_id = self.special_ids[IM_END]
    self.pad_id = self.special_ids[END_OF_TEXT]
    self.stop_ids = (self.eos_id, self.pad_id)
    self._split = re.compile("(" + "|".join(re.escape(t) for t in BYTE_SPECIALS) + ")")

  def decode(self, ids) -> str:
    """ids -> text; invalid UTF-8 becomes U+FFFD, unused ids above the specials decode to ''."""
    out, run = [], bytearray()
    for i in _check_ids(ids, self.vocab_size):
      if i < 256:
        run.append(i)
        continue
      out.append(run.decode("utf-8", errors="replace"))
      run = bytearray()
      out.append(self._special_strings.get(i, ""))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def _encode_with_starts(self, text):
    ids, starts, pos = [], [], 0
    for part in self._split.split(text):
      if part in self.special_ids:
        ids.append(self.special_ids[part])
        starts.append(pos)
      else:
        for j, ch in enumerate(part):
          raw = ch.encode("utf-8", errors="surrogatepass")
          ids.extend(raw)
          starts.extend([pos + j] * len(raw))
      pos += len(part)
    return ids, starts


# --- helpers -------------------------------------------------------------------------------


def _assistant_body(msg) -> str:
  content = msg.get("content") or ""
  parts = [content]
  for j, call in enumerate(msg.get("tool_calls") or ()):
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
      raise ValueError(f"assistant tool_calls[{j}] must be {{'function': {{'name': str, "
                       f"'arguments': str|dict}}}}, got {call!r}")
    args = fn.get("arguments", {})
    args = args if isinstance(args, str) else _tojson(args)
    sep = "\n" if (j > 0 or content) else ""
    parts.append(f'{sep}{TOOL_CALL_OPEN}\n{{"name": "{fn["name"]}", "arguments": {args}}}\n'
                 f"{TOOL_CALL_CLOSE}")
  return "".join(parts)


def _parse_call(inner: str):
  try:
    obj = json.loads(inner.strip())
  except json.JSONDecodeError as e:
    return None, f"tool call is not valid JSON ({e.msg}): {inner.strip()[:80]!r}"
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
    return None, f"tool call needs a non-empty string \"name\": {inner.strip()[:80]!r}"
  args = obj.get("arguments", {})
  if isinstance(args, str):  # some models emit arguments as a JSON string, like OpenAI
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
      return None, f"tool call {obj['name']!r}: arguments string is not JSON: {args[:80]!r}"
  if not isinstance(args, dict):
    return None, f"tool call {obj['name']!r}: arguments must be an object, got {args!r:.80}"
  return {"name": obj["name"], "arguments": args}, None


def _tojson(obj) -> str:
  # Same as the `tojson` filter of transformers' chat templates.
  return json.dumps(obj, ensure_ascii=False)


def _check_text(text):
  if not isinstance(text, str):
    raise ValueError(f"text must be a str, got {type(text).__name__}")
  return text


def _check_ids(ids, vocab_size):
  arr = np.asarray(ids).reshape(-1)
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
  if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}); got min "
                     f"{arr.min()} max {arr.max()}")
  return [int(i) for i in arr]


def _check_messages(messages):
  if not isinstance(messages, (list, tuple)):
    raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
  for i, msg in enumerate(messages):
    if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
      raise ValueError(f"messages[{i}] must be a dict with role in {_ROLES}, got {msg!r:.120}")
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
      raise ValueError(f"messages[{i}].content must be a str, got {type(content).__name__}")
    if content is None and not (msg["role"] == "assistant" and msg.get("tool_calls")):
      raise ValueError(f"messages[{i}] ({msg['role']}) has no content")
    if msg.get("tool_calls") and msg["role"] != "assistant":
      raise ValueError(f"messages[{i}]: only assistant messages may carry tool_calls")


def _check_tool(tool):
  fn = tool.get("function") if isinstance(tool, dict) else None
  if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
    raise ValueError(f"tool spec must be {{'type': 'function', 'function': {{'name': ..., "
                     f"'parameters': ...}}}}, got {tool!r:.120}")
  return tool


def _pick_id(vocab, explicit, candidates, what, default=None):
  if explicit is not None:
    if explicit not in vocab:
      raise ValueError(f"{what} token {explicit!r} is not in the tokenizer's vocabulary")
    return vocab[explicit]
  for tok in candidates:
    if tok in vocab:
      return vocab[tok]
  if default is not None:
    return default
  raise ValueError(f"tokenizer has none of the {what} tokens {candidates}; pass "
                   f"{what}_token= explicitly")
