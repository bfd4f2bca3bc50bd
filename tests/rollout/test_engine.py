"""The engine against the plain `Sampler`: same tokens for the same seeds under continuous
batching and prefix caching; versions per token; cancellation frees rows; overload.

One tiny model, one sampler and one engine per module; the engine's cache is fixed at the
sampler's max_len (min_cache) so each program compiles once.
"""

import time

import jax
import numpy as np
import pytest

from katjax.model import TINY, ByteTokenizer, init
from katjax.rollout.engine import Engine, Overloaded
from katjax.rollout.sampler import Sampler, SamplingParams

CFG = TINY.replace(vocab_size=272)
MAX_LEN = 64
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [40, 41], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109,
                                            110, 111, 112], [9, 9, 9, 9]]


@pytest.fixture(scope="module")
def params():
  return init(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sampler(params):
  return Sampler(CFG, params, max_len=MAX_LEN, chunk=8, tokenizer=ByteTokenizer(), stop_ids=())


@pytest.fixture(scope="module")
def plain(params):
  """A second reference, never touched by the engine's weight updates."""
  return Sampler(CFG, params, max_len=MAX_LEN, chunk=8, tokenizer=ByteTokenizer(), stop_ids=())


@pytest.fixture(scope="module")
def engine(sampler):
  # The reference sampler's compiled decode serves the engine too (same shapes: 4 rows).
  eng = Engine(sampler, rows=4, min_cache=MAX_LEN)
  yield eng
  eng.close()


def _same(ref, got):
  for (a,), (b,) in zip(ref, got):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-5)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5)
    assert a.finish_reason == b.finish_reason


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.0, max_new_tokens=20),
                                SamplingParams(temperature=0.9, top_k=40, max_new_tokens=20)])
def test_multi_turn_matches_plain_sampler(engine, plain, sp):
  """Turn 2 re-sends turn 1's prompt + answer + a tool result: its prefix comes from cache."""
  before = engine.snapshot()
  ref1, got1 = plain.generate(PROMPTS, sp, seed=3), engine.generate(PROMPTS, sp, seed=3)
  _same(ref1, got1)
  turn2 = [list(p) + list(c[0].tokens) + [7, 8, 9] for p, c in zip(PROMPTS, got1)]
  ref2, got2 = plain.generate(turn2, sp, seed=5), engine.generate(turn2, sp, seed=5)
  _same(ref2, got2)
  after = engine.snapshot()
  hit = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
  # Every turn-2 prompt holds its turn-1 prompt and all but the last generated token.
  assert hit >= sum(len(p) + len(c[0].tokens) - 1 for p, c in zip(PROMPTS, got1))


def test_staggered_arrivals_join_running_batches(engine, plain):
  """Requests submitted while others decode join between chunks, with the same tokens."""
  sp = SamplingParams(temperature=0.7, max_new_tokens=40)
  prompts = [[200 + i, 3, 4 + i] for i in range(4)]  # no prefix shared with earlier tests
  ref = plain.generate(prompts, sp, seed=11)
  chunks0 = engine.snapshot()["shared_chunks"]
  reqs = []
  for i, p in enumerate(prompts):
    reqs.append(engine.submit(p, sp, seed=11 + i))
    while i < 3 and not reqs[-1].tokens(0):  # the next one arrives mid-generation
      time.sleep(0.005)
  for r in reqs:
    r.event.wait(60)
  _same(ref, [r.result for r in reqs])
  assert engine.snapshot()["shared_chunks"] > chunks0  # they overlapped in decode chunks


def test_forks_and_shared_system_prompt(engine, plain):
  sp = SamplingParams(temperature=1.0, max_new_tokens=12)
  system = list(range(30, 50))
  a, b = system + [1], system + [2, 3]
  # Reference rows (4, as the engine's pool: one compiled shape): a's two forks, then b.
  key = lambda s, j: jax.random.fold_in(jax.random.PRNGKey(s), j)
  ref = plain.generate([a, a, b, [7]], sp, keys=[key(4, 0), key(4, 1), key(9, 0), key(0, 0)])
  forks = engine.generate([a], sp, n=2, seed=4)[0]
  for j in range(2):
    np.testing.assert_array_equal(forks[j].tokens, ref[j][0].tokens)
  hit0 = engine.snapshot()["prefix_hit_tokens"]
  other = engine.generate([b], sp, seed=9)  # another agent, same system prompt
  assert engine.snapshot()["prefix_hit_tokens"] - hit0 == len(system)
  np.testing.assert_array_equal(other[0][0].tokens, ref[2][0].tokens)


def test_weight_update_between_chunks_versions_tokens(engine, plain, params):
  new = init(CFG, jax.random.PRNGKey(7))
  v0 = engine.version
  sp = SamplingParams(temperature=0.0, max_new_tokens=40)
  req = engine.submit([5, 6, 7, 8], sp)
  while len(req.tokens(0)) < 2:
    time.sleep(0.002)
  engine.update_weights(new)
  req.event.wait(60)
  (comp,) = req.result
  try:
    v = comp.version
    assert v[0] == v0 and v[-1] == v0 + 1 and np.all(np.diff(v) >= 0)
    k = int(np.argmax(v == v0 + 1))  # first token of the new weights
    assert k % 8 == 1  # at a chunk boundary (the first token comes from the prefill)
    old = plain.generate([[5, 6, 7, 8]] + PROMPTS[1:], sp)[0][0]  # the 4-row shape
    np.testing.assert_array_equal(comp.tokens[:k], old.tokens[:k])
    assert not np.array_equal(comp.tokens[k:], old.tokens[k:])  # the new weights decide
  finally:
    engine.update_weights(params)
    while engine.version < v0 + 2:
      engine.generate([[1]], SamplingParams(max_new_tokens=1))


def test_cancel_frees_rows(engine):
  sp = SamplingParams(temperature=0.0, max_new_tokens=60)
  req = engine.submit([3, 1, 4], sp)
  while not req.tokens(0):
    time.sleep(0.002)
  engine.cancel(req)
  req.event.wait(30)
  assert req.result[0].finish_reason == "cancelled" and len(req.result[0].tokens) < 60
  t0 = time.monotonic()
  while engine.snapshot()["running_rows"]:
    assert time.monotonic() - t0 < 10
    time.sleep(0.01)


def test_overload_and_bad_input(sampler):
  eng = Engine(sampler, rows=4, max_queue=1, min_cache=MAX_LEN)
  try:
    long = SamplingParams(temperature=0.0, max_new_tokens=60)
    first = eng.submit([1, 2], long, n=4)  # every row
    while eng.snapshot()["running"] != 1:
      time.sleep(0.005)
    eng.submit([1, 2], long)
    with pytest.raises(Overloaded, match="max_queue=1"):
      eng.submit([1, 2], long)
    eng.cancel(first)
    with pytest.raises(ValueError, match="n must be"):
      eng.submit([1], SamplingParams(max_new_tokens=4), n=8)
    with pytest.raises(ValueError, match="token ids must lie"):
      eng.submit([1, 999])
  finally:
    eng.close()


def _plain_tokens(plain, prompt, sp):
  return plain.generate([prompt], sp)[0][0].tokens


def test_a_request_that_cannot_finish_fails_alone(engine, plain, monkeypatch):
  """An error while completing one request (say its tokens do not decode) reaches that
  caller; the others finish, and none is left waiting (its rows are already free)."""
  real, calls = engine._finish, []

  def flaky(req):
    calls.append(req)
    if len(calls) == 1:
      raise ValueError("cannot decode")
    return real(req)

  monkeypatch.setattr(engine, "_finish", flaky)
  sp = SamplingParams(temperature=0.0, max_new_tokens=6)
  with engine._cv:  # all four queued before the worker looks: one admission round
    reqs = [engine.submit(p, sp) for p in PROMPTS]
  for req in reqs:
    assert req.event.wait(60), "a request was dropped: its caller would wait forever"
  failed = [r for r in reqs if r.error is not None]
  assert failed == calls[:1] and "cannot decode" in str(failed[0].error)
  for req, prompt in zip(reqs, PROMPTS):
    if req.error is None:
      np.testing.assert_array_equal(req.result[0].tokens, _plain_tokens(plain, prompt, sp))


def test_a_failed_admission_requeues_the_requests_behind_it(engine, plain, monkeypatch):
  """An admission that raises fails the running rows and itself; requests taken from the
  queue after it were untouched: they go back to the queue and complete normally."""
  real = engine._admit
  sp = SamplingParams(temperature=0.0, max_new_tokens=6)

  def admit(req):
    if list(req.prompt) == PROMPTS[1]:
      raise RuntimeError("prefill failed")
    return real(req)

  monkeypatch.setattr(engine, "_admit", admit)
  with engine._cv:
    reqs = [engine.submit(p, sp) for p in PROMPTS]
  for req in reqs:
    assert req.event.wait(60), "a request was dropped: its caller would wait forever"
  assert [r.error is not None for r in reqs] == [True, True, False, False]
  assert "prefill failed" in str(reqs[1].error)
  for req, prompt in zip(reqs[2:], PROMPTS[2:]):
    np.testing.assert_array_equal(req.result[0].tokens, _plain_tokens(plain, prompt, sp))
