"""OpenAI wire format: request validation (ValueError -> HTTP 400) and response rendering.

Kept apart from the HTTP plumbing so it is testable without sockets. Field names follow the
OpenAI API; katjax adds `top_k` and `stop_token_ids` to requests, and `token_ids`,
`raw_logprobs`, `sampling_logprobs`, `entropy`, `version` (policy version per token) per
choice plus `prompt_token_ids`. Fields scaffolds send with neutral values (`logit_bias: {}`,
penalties 0, `response_format: {"type": "text"}`, `user`, `parallel_tool_calls`, ...) are
accepted; a value this server cannot honour is a 400 naming the field. A prompt that does not
fit the context is a 400 with OpenAI's code `context_length_exceeded`, which clients handle
instead of retrying.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid

from katjax.rollout.sampler import SamplingParams

__all__ = ["Context", "Request", "BadRequest", "parse_chat", "parse_completion",
           "render_response", "logprob_entries", "models_response", "error"]

_TOOL_CHOICES = ("none", "auto", "required")
_MAX_TOP_LOGPROBS = 20


class BadRequest(ValueError):
  """HTTP 400: `param` is the offending field, `code` OpenAI's error code (or None)."""

  def __init__(self, message, param=None, code=None):
    super().__init__(message)
    self.param, self.code = param, code


@dataclasses.dataclass(frozen=True)
class Context:
  tokenizer: object
  model_name: str = "katjax"
  max_n: int = 16
  max_len: int = 2048  # the model's context (the sampler's max_len)
  default_max_tokens: int = 1024


@dataclasses.dataclass
class Request:
  kind: str  # "chat" | "completion"
  prompt_ids: list
  sampling: SamplingParams
  n: int
  seed: int
  logprobs: bool
  tools: list | None = None
  tool_choice: object = "auto"
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage
  top_logprobs: int = 0
  model: str | None = None  # echoed in the response


def error(message: str, kind: str = "invalid_request_error", code=None, param=None) -> dict:
  """OpenAI error body."""
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models_response(ctx: Context) -> dict:
  return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": 0,
                                      "owned_by": "katjax"}]}


def parse_chat(body, ctx: Context) -> Request:
  """Validates a /v1/chat/completions body; ValueError names the bad field."""
  _check_object(body)
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise BadRequest("'messages' must be a non-empty list of message objects", "messages")
  messages = [_normalize_message(i, m) for i, m in enumerate(messages)]
  tools = body.get("tools") or None
  if tools is not None:
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools):
      raise BadRequest("'tools' must be a list of {'type': 'function', 'function': {'name': "
                       "str, 'parameters': {...}}}", "tools")
  choice = body.get("tool_choice", "auto")
  if choice is None:
    choice = "auto"
  if not (choice in _TOOL_CHOICES or (isinstance(choice, dict) and isinstance(
      choice.get("function"), dict) and isinstance(choice["function"].get("name"), str))):
    raise BadRequest(f"'tool_choice' must be one of {_TOOL_CHOICES} or {{'type': 'function', "
                     f"'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")
  try:
    ids, _ = ctx.tokenizer.encode_chat(messages, tools, add_generation_prompt=True)
  except ValueError as e:
    raise BadRequest(f"bad 'messages': {e}", "messages") from None
  return _finish(body, ctx, "chat", [int(i) for i in ids], tools, choice)


def parse_completion(body, ctx: Context) -> Request:
  """Validates a /v1/completions body (one prompt: a string or a list of token ids)."""
  _check_object(body)
  prompt = body.get("prompt")
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
    prompt = prompt[0]
  if isinstance(prompt, str) and prompt:
    ids = ctx.tokenizer.encode(prompt)
  elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(
      t, bool) for t in prompt):
    ids = prompt
    vocab = ctx.tokenizer.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
      raise BadRequest(f"'prompt' token ids must lie in [0, {vocab})", "prompt")
  else:
    raise BadRequest("'prompt' must be a non-empty string or a non-empty list of token ids "
                     "(one prompt per request)", "prompt")
  return _finish(body, ctx, "completion", list(ids), None, "none")


def render_response(req: Request, completions, ctx: Context) -> dict:
  """Sampler completions -> chat.completion or text_completion body."""
  tok = ctx.tokenizer
  choices = []
  for i, comp in enumerate(completions):
    ids = [int(t) for t in comp.tokens]
    body_ids = ids
    stops = req.sampling.stop_ids if req.sampling.stop_ids is not None else tok.stop_ids
    if comp.finish_reason == "stop" and ids and ids[-1] in stops and comp.text is None:
      body_ids = ids[:-1]
    text = comp.text if comp.text is not None else tok.decode(body_ids)
    for s in ([tok.decode([ids[-1]])] if ids and ids[-1] in stops else []):
      if text.endswith(s):
        text = text[:-len(s)]
    finish = "length" if comp.finish_reason == "length" else "stop"
    choice = {"index": i, "finish_reason": finish, "token_ids": ids,
              "raw_logprobs": [float(x) for x in comp.raw_logprobs],
              "sampling_logprobs": [float(x) for x in comp.logprobs],
              "entropy": [float(x) for x in comp.entropy],
              "version": [int(x) for x in comp.version]}
    if req.kind == "chat":
      message = {"role": "assistant", "content": text}
      if req.tools and req.tool_choice != "none":
        content, calls, errors = tok.parse_tool_calls(text)
        if calls:
          message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                    "function": {"name": c["name"], "arguments": json.dumps(
                                        c["arguments"], ensure_ascii=False)}} for c in calls]
          message["content"] = (text if errors else content) or None
          choice["finish_reason"] = "tool_calls" if finish == "stop" else finish
      choice["message"] = message
      choice["logprobs"] = ({"content": logprob_entries(req, comp, tok)}
                            if req.logprobs else None)
    else:
      choice["text"] = text
      choice["logprobs"] = ({"tokens": [tok.decode([t]) for t in ids],
                             "token_logprobs": [float(x) for x in comp.raw_logprobs],
                             "top_logprobs": None, "text_offset": []}
                            if req.logprobs else None)
    choices.append(choice)
  completion_tokens = sum(len(c.tokens) for c in completions)
  return {"id": f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
          "object": "chat.completion" if req.kind == "chat" else "text_completion",
          "created": int(time.time()), "model": req.model or ctx.model_name,
          "choices": choices,
          "prompt_token_ids": req.prompt_ids,
          "usage": {"prompt_tokens": len(req.prompt_ids),
                    "completion_tokens": completion_tokens,
                    "total_tokens": len(req.prompt_ids) + completion_tokens}}


# --- helpers ------------------------------------------------------------------------------------


def logprob_entries(req: Request, comp, tok, start: int = 0) -> list:
  """OpenAI `logprobs.content` entries for tokens [start:] (raw logprobs; top ones if asked)."""
  out = []
  tops = comp.top_logprobs or []
  for t in range(start, len(comp.tokens)):
    piece = tok.decode([int(comp.tokens[t])])
    entry = {"token": piece, "logprob": float(comp.raw_logprobs[t]),
             "bytes": list(piece.encode("utf-8")), "top_logprobs": []}
    if req.top_logprobs and t < len(tops):
      entry["top_logprobs"] = [
          {"token": tok.decode([i]), "logprob": float(lp),
           "bytes": list(tok.decode([i]).encode("utf-8"))}
          for i, lp in list(zip(*tops[t]))[:req.top_logprobs]]
    out.append(entry)
  return out


def _finish(body, ctx, kind, ids, tools, choice) -> Request:
  _check_neutral(body)
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise BadRequest(f"'model' must be a string, got {model!r}", "model")
  stream = body.get("stream", False)
  if not isinstance(stream, bool) and stream is not None:
    raise BadRequest(f"'stream' must be a boolean, got {stream!r}", "stream")
  opts = body.get("stream_options") or {}
  if not isinstance(opts, dict):
    raise BadRequest("'stream_options' must be an object", "stream_options")
  n = _int(body, "n", 1, 1, ctx.max_n)
  temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
  top_p = _num(body, "top_p", 1.0, 0.0, 1.0)
  if top_p <= 0:
    raise BadRequest("'top_p' must be in (0, 1]", "top_p")
  top_k = body.get("top_k", 0)
  top_k = 0 if top_k == -1 else top_k  # vLLM spells "off" as -1
  if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
    raise BadRequest(f"'top_k' must be an int >= 0 (or -1 for off), got {top_k!r}", "top_k")
  room = ctx.max_len - len(ids)
  if room < 1:
    raise BadRequest(f"This model's maximum context length is {ctx.max_len} tokens. However, "
                     f"your messages resulted in {len(ids)} tokens. Please reduce the length "
                     f"of the messages.", "messages", "context_length_exceeded")
  key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  max_tokens = _int(body, key, min(ctx.default_max_tokens, room), 1, None)
  if max_tokens > room:
    raise BadRequest(f"This model's maximum context length is {ctx.max_len} tokens. However, "
                     f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                     f"messages, {max_tokens} in '{key}'). Please reduce the length of the "
                     f"messages or '{key}'.", key, "context_length_exceeded")
  stop = body.get("stop")
  stop = [stop] if isinstance(stop, str) else (stop or [])
  if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s
                                                            for s in stop):
    raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
  stop_ids = body.get("stop_token_ids")
  if stop_ids is not None and not (isinstance(stop_ids, list) and all(
      isinstance(t, int) and t >= 0 for t in stop_ids)):
    raise BadRequest("'stop_token_ids' must be a list of non-negative ints", "stop_token_ids")
  if stop_ids is not None:
    stop_ids = tuple(stop_ids) + tuple(ctx.tokenizer.stop_ids)
  logprobs = body.get("logprobs", False)
  if kind == "completion" and isinstance(logprobs, int) and not isinstance(logprobs, bool):
    logprobs = logprobs is not None and logprobs >= 0
  if not isinstance(logprobs, bool) and logprobs is not None:
    raise BadRequest(f"'logprobs' must be a boolean, got {logprobs!r}", "logprobs")
  top = _int(body, "top_logprobs", 0, 0, _MAX_TOP_LOGPROBS)
  seed = body.get("seed")
  if seed is None:
    seed = random.randrange(2 ** 31)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 31:
    raise BadRequest(f"'seed' must be an int in [0, 2**31), got {seed!r}", "seed")
  sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                            max_new_tokens=max_tokens, stop=tuple(stop), stop_ids=stop_ids)
  return Request(kind=kind, prompt_ids=ids, sampling=sampling, n=n, seed=seed,
                 logprobs=bool(logprobs) or top > 0, tools=tools, tool_choice=choice,
                 stream=bool(stream), include_usage=bool(opts.get("include_usage")),
                 top_logprobs=top, model=model)


def _check_neutral(body):
  """Fields scaffolds send with values that change nothing; anything else is refused."""
  for key in ("presence_penalty", "frequency_penalty"):
    v = body.get(key)
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v != 0):
      raise BadRequest(f"'{key}' is not supported by this server (only 0), got {v!r}", key)
  bias = body.get("logit_bias")
  if bias is not None and bias != {}:
    raise BadRequest(f"'logit_bias' is not supported by this server (only {{}}), got {bias!r}",
                     "logit_bias")
  fmt = body.get("response_format")
  if fmt is not None and fmt != {"type": "text"}:
    raise BadRequest("'response_format' is not supported by this server (only "
                     f"{{'type': 'text'}}), got {fmt!r}", "response_format")
  if body.get("parallel_tool_calls") not in (None, True, False):
    raise BadRequest("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
  if body.get("user") is not None and not isinstance(body["user"], str):
    raise BadRequest("'user' must be a string", "user")


def _check_object(body):
  if not isinstance(body, dict):
    raise ValueError("request body must be a JSON object")


def _normalize_message(i, msg):
  if not isinstance(msg, dict):
    raise BadRequest(f"messages[{i}] must be an object", "messages")
  content = msg.get("content")
  if isinstance(content, list):  # content parts: keep the text ones
    if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
      raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
    msg = dict(msg, content="".join(p.get("text", "") for p in content))
  return msg


def _num(body, key, default, lo, hi):
  value = body.get(key)
  if value is None:
    return default
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
    raise BadRequest(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", key)
  return value


def _int(body, key, default, lo, hi):
  value = body.get(key)
  if value is None:
    return default
  if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
      hi is not None and value > hi):
    bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise BadRequest(f"'{key}' must be an int {bound}, got {value!r}", key)
  return value
