"""The trajectory manager as an OpenAI-compatible endpoint: unmodified agents, exact tokens.

`serve_recorded(engine, tokenizer, manager)` starts katjax's OpenAI server over `engine`
and records every answered request into `manager` before the client sees the answer: the
session is the `/sessions/<id>` path prefix of the client's base URL
(`OpenAI(base_url=f"{url}/sessions/{episode}/v1")`); requests without one go to the session
"default". What is recorded
is what the engine consumed (the server's prompt ids, after the chat template) and produced
(each choice's token ids, sampler logprobs, entropies and per-token policy versions): the
client's text is never re-tokenised into training data. When a scaffold's next request does
not extend what it was answered (its template rewrote the history), the manager starts a
new branch and counts a prefix mismatch. Rewards come from the grader:
`manager.finish(session, reward)`.

`ProxyClient(url)` is the other end for `run_flow`: a picklable `connect(session)` that
gives an episode, wherever it runs (a Ray worker on another node), an `OpenAIClient` of its
session on this proxy.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

from katjax.flow.trajectories import TrajectoryManager
from katjax.rollout.server import serve


def serve_recorded(engine, tokenizer, manager: TrajectoryManager, **serve_kw):
  """A running `katjax.rollout.server.Server` whose answers `manager` records."""

  def record(session, req, completions):
    for comp in completions:
      manager.record(session or "default", req.prompt_ids, comp.tokens, comp.logprobs,
                     comp.entropy, version=comp.version)

  return serve(engine, tokenizer, recorder=record, **serve_kw)


@dataclasses.dataclass(frozen=True)
class ProxyClient:
  """connect(session) -> an `OpenAIClient` of `session` on the proxy at `url` (picklable)."""

  url: str
  model: str = "katjax"

  def __call__(self, session: str):
    from katjax.rollout.client import OpenAIClient
    return OpenAIClient(f"{self.url}/sessions/{urllib.parse.quote(session, safe='')}/v1",
                        model=self.model)
