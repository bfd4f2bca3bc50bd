"""Client backend for any OpenAI-compatible server (vLLM, SGLang, JetStream, katjax's own).

`OpenAIClient.generate(prompts, sampling, n=...)` has the `Sampler.generate` signature and
returns `Completion`s, so the agent loop runs unchanged against an external server. It sends
token ids to `/v1/completions` (token in, token out: the trajectory stays exactly what the
model saw) and reads generated ids back from, in order: katjax's `token_ids`, vLLM's
`token_id:N` strings (`return_tokens_as_token_ids`), or re-encoding the text (last resort,
flagged `exact_ids=False` in `last_info`). Logprobs are kept when the server returns them;
entropy and policy version per token are only known from a katjax server (zeros otherwise). `chat(...)` is the plain
chat-completions call for scaffolds that work with messages.

Standard library only (urllib); one request per prompt, sent concurrently.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import numpy as np

from katjax.rollout.sampler import Completion, SamplingParams

__all__ = ["OpenAIClient", "ServerError"]


class ServerError(RuntimeError):
  """A non-2xx answer; `.status` is the HTTP code, the message is the server's."""

  def __init__(self, status, message):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status


class OpenAIClient:
  """Talks to `base_url` (e.g. http://127.0.0.1:8000/v1) as model `model`."""

  def __init__(self, base_url: str, model: str | None = None, *, api_key: str = "EMPTY",
               timeout: float = 600.0, tokenizer=None, max_workers: int = 16):
    self.base_url = base_url.rstrip("/")
    if not self.base_url.endswith("/v1"):
      self.base_url += "/v1"
    self.api_key, self.timeout, self.tokenizer = api_key, timeout, tokenizer
    self.max_workers = max_workers
    self.model = model or self.models()[0]
    self.last_info: dict = {}

  def models(self) -> list[str]:
    return [m["id"] for m in self._request("GET", "/models")["data"]]

  def chat(self, messages, tools=None, **kwargs) -> dict:
    """POST /chat/completions; returns the response body (OpenAI format)."""
    body = dict(model=self.model, messages=messages, **kwargs)
    if tools:
      body["tools"] = tools
    return self._request("POST", "/chat/completions", body)

  def generate(self, prompts, sampling: SamplingParams | None = None, *, n: int = 1,
               seed: int = 0, keys=None, cancelled=None) -> list[list[Completion]]:
    """Sampler-compatible: token-id prompts -> per prompt, n Completions.

    `keys` is not supported (servers take integer seeds); `cancelled` is accepted for
    signature compatibility (an HTTP request cannot be recalled once sent).
    """
    if keys is not None:
      raise ValueError("OpenAIClient.generate: PRNG keys are not supported, pass seed=")
    sampling = sampling or SamplingParams()
    plist = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
    jobs = [(list(map(int, p)), sp, seed + i) for i, (p, sp) in enumerate(zip(prompts, plist))]
    with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(jobs) or 1)) as pool:
      return list(pool.map(lambda j: self._complete(*j, n), jobs))

  # --- internals --------------------------------------------------------------------------

  def _complete(self, prompt, sp, seed, n):
    body = dict(model=self.model, prompt=prompt, n=n, temperature=sp.temperature,
                top_p=sp.top_p, max_tokens=sp.max_new_tokens, logprobs=1, seed=seed,
                return_tokens_as_token_ids=True, skip_special_tokens=False)
    if sp.top_k:
      body["top_k"] = sp.top_k
    if sp.stop:
      body["stop"] = list(sp.stop)
    if sp.stop_ids is not None:
      body["stop_token_ids"] = list(sp.stop_ids)
    resp = self._request("POST", "/completions", body)
    return [self._completion(c, len(prompt)) for c in resp["choices"]]

  def _completion(self, choice, prompt_len):
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    exact = ids is not None
    if ids is None and lp.get("tokens") and all(
        str(t).startswith("token_id:") for t in lp["tokens"]):
      ids, exact = [int(str(t)[9:]) for t in lp["tokens"]], True
    if ids is None:
      if self.tokenizer is None:
        raise ValueError("server returned no token ids; pass tokenizer= to re-encode text")
      ids = self.tokenizer.encode(choice.get("text", ""))
    self.last_info = {"exact_ids": exact}
    k = len(ids)
    raw = choice.get("raw_logprobs") or lp.get("token_logprobs") or [0.0] * k
    samp = choice.get("sampling_logprobs") or raw
    ent = choice.get("entropy") or [0.0] * k
    version = np.asarray((choice.get("version") or [0] * k)[:k], np.int32)
    arr = lambda x: np.asarray([0.0 if v is None else v for v in x][:k] + [0.0] * (k - len(x)),
                               np.float32)
    reason = {"length": "length"}.get(choice.get("finish_reason"), "stop")
    return Completion(tokens=np.asarray(ids, np.int32), logprobs=arr(samp),
                      raw_logprobs=arr(raw), entropy=arr(ent), finish_reason=reason,
                      prompt_len=prompt_len, text=choice.get("text"),
                      version=np.pad(version, (0, k - len(version))))

  def _request(self, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
    try:
      with urllib.request.urlopen(req, timeout=self.timeout) as r:
        return json.loads(r.read())
    except urllib.error.HTTPError as e:
      try:
        msg = json.loads(e.read())["error"]["message"]
      except Exception:  # noqa: BLE001 - not an OpenAI error body
        msg = e.reason
      raise ServerError(e.code, msg) from None
