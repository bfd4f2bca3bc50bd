"""Sampler vs an uncached reference: a full forward over the whole sequence at every step.

The reference never touches the KV cache: it runs `katjax.model.apply` on the growing
sequence (right-padded to one fixed length; causal attention makes the padding invisible)
and does the sampling maths in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from katjax.model import TINY, ByteTokenizer, apply, init
from katjax.rollout.sampler import Sampler, SamplingParams, bucket

CFG = TINY.replace(vocab_size=272)
REF_LEN = 64
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [40, 41], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109,
                                            110, 111, 112], [9, 9, 9, 9]]


@pytest.fixture(scope="module")
def params():
  return init(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sampler(params):
  return Sampler(CFG, params, max_len=REF_LEN, chunk=8, tokenizer=ByteTokenizer(),
                 stop_ids=())


def ref_logits(params, seq):
  """Raw next-token logits float64[V] after `seq`, by a full uncached forward."""
  buf = np.zeros((1, REF_LEN), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(apply(CFG, params, buf)[0, len(seq) - 1], np.float64)


def np_log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def np_filter(logits, temperature, top_k, top_p):
  """Top-k then nucleus filter in NumPy: bool[V] of kept ids, on logits / temperature."""
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  k = top_k if top_k > 0 else len(z)
  probs = np.exp(np_log_softmax(z[order[:k]]))
  mass, n_keep = 0.0, 0
  for p in probs:
    if mass >= top_p:
      break
    mass += p
    n_keep += 1
  keep = np.zeros(len(z), bool)
  keep[z >= z[order[max(n_keep, 1) - 1]]] = True
  return keep, z


def test_greedy_cached_equals_uncached_recompute(sampler, params):
  sp = SamplingParams(temperature=0.0, max_new_tokens=24)
  outs = sampler.generate(PROMPTS, sp)
  for prompt, (comp,) in zip(PROMPTS, outs):
    seq = list(prompt)
    assert len(comp.tokens) == 24 and comp.finish_reason == "length"
    for t, tok in enumerate(comp.tokens):
      logp = np_log_softmax(ref_logits(params, seq))
      assert tok == int(np.argmax(logp)), f"token {t} differs"
      np.testing.assert_allclose(comp.raw_logprobs[t], logp[tok], atol=1e-5)
      np.testing.assert_allclose(comp.entropy[t], -(np.exp(logp) * logp).sum(), atol=1e-5)
      assert comp.logprobs[t] == 0.0  # greedy: the sampling distribution is a point mass
      seq.append(int(tok))


def test_sampled_logprobs_match_numpy_filter(sampler, params):
  sp = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, max_new_tokens=12)
  outs = sampler.generate(PROMPTS, sp, seed=3)
  for prompt, (comp,) in zip(PROMPTS, outs):
    seq = list(prompt)
    for t, tok in enumerate(comp.tokens):
      logits = ref_logits(params, seq)
      keep, z = np_filter(logits, 0.7, 40, 0.8)
      assert keep[tok], "sampled a token outside the top-k / top-p set"
      lp = np_log_softmax(np.where(keep, z, -np.inf))
      np.testing.assert_allclose(comp.logprobs[t], lp[tok], atol=1e-4)
      np.testing.assert_allclose(comp.raw_logprobs[t], np_log_softmax(logits)[tok], atol=1e-5)
      seq.append(int(tok))


def test_fork_equals_independent_runs(sampler):
  sp = SamplingParams(temperature=1.0, max_new_tokens=16)
  keys = jnp.stack([jax.random.PRNGKey(100 + j) for j in range(4)])
  forked = sampler.fork(PROMPTS[0], 4, sp, keys=keys)
  # Independent: the same prompt four times, each prefilled on its own, with the same keys.
  alone = sampler.generate([PROMPTS[0]] * 4, sp, keys=keys)
  for j in range(4):
    np.testing.assert_array_equal(forked[j].tokens, alone[j][0].tokens)
    np.testing.assert_allclose(forked[j].logprobs, alone[j][0].logprobs, atol=1e-5)
  assert len({tuple(c.tokens) for c in forked}) > 1  # different keys, different branches


def test_update_weights_swaps_without_recompiling(sampler, params):
  sp = SamplingParams(temperature=0.0, max_new_tokens=8)
  sampler.generate(PROMPTS, sp)
  sizes = (sampler._start._cache_size(), sampler._decode._cache_size())
  new = init(CFG, jax.random.PRNGKey(7))
  sampler.update_weights(new)
  try:
    (comp,), *_ = sampler.generate(PROMPTS, sp)
    assert (sampler._start._cache_size(), sampler._decode._cache_size()) == sizes
    seq = list(PROMPTS[0])
    for tok in comp.tokens:  # the new weights are really used
      assert tok == int(np.argmax(ref_logits(new, seq)))
      seq.append(int(tok))
    with pytest.raises(ValueError, match="structure, shape or dtype"):
      sampler.update_weights(jax.tree.map(lambda x: x[..., :1], new))
  finally:
    sampler.update_weights(params)


def test_stop_strings_and_stop_ids(sampler):
  greedy = SamplingParams(temperature=0.0, max_new_tokens=24)
  (full,), *_ = sampler.generate(PROMPTS, greedy)
  tok = ByteTokenizer()
  text = tok.decode(full.tokens)
  # a stop id: generation ends on (and includes) the first occurrence
  stop_id = int(full.tokens[5])
  first = int(np.argmax(full.tokens == stop_id))
  (cut,), *_ = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24,
                                                        stop_ids=(stop_id,)))
  np.testing.assert_array_equal(cut.tokens, full.tokens[:first + 1])
  assert cut.finish_reason == "stop"
  # a stop string taken from the greedy text: text ends right before it
  stop = text[10:12] if text[10:12].strip("\ufffd") else None
  if stop:
    (cut,), *_ = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24,
                                                          stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)]
    assert stop in tok.decode(cut.tokens) and stop not in tok.decode(cut.tokens[:-1])


def test_prompt_longer_than_cache(params, sampler):
  long = list(range(1, 31))
  sp = SamplingParams(temperature=0.0, max_new_tokens=50)
  with pytest.raises(ValueError, match="holds at most 14 prompt tokens"):
    sampler.generate([long] + PROMPTS[1:], sp)
  trunc = Sampler(CFG, params, max_len=REF_LEN, chunk=8, stop_ids=(), truncate_prompt=True)
  trunc._start, trunc._decode = sampler._start, sampler._decode  # same programs, no recompile
  a = trunc.generate([long] + PROMPTS[1:], sp)[0][0]
  b = sampler.generate([long[-14:]] + PROMPTS[1:], sp)[0][0]
  np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                dict(top_k=-2), dict(max_new_tokens=0), dict(stop=("",))])
def test_invalid_sampling_params(kw):
  with pytest.raises(ValueError, match="SamplingParams"):
    SamplingParams(**kw)


def test_bad_prompts(sampler):
  with pytest.raises(ValueError, match="token ids must lie in"):
    sampler.generate([[1, 2, 999]])
  with pytest.raises(ValueError, match="non-empty"):
    sampler.generate([[]])


def test_cancellation_stops_rows(sampler):
  calls = []

  def cancelled(i):
    calls.append(i)
    return i == 1 and len(calls) > 4  # prompt 1 is cancelled at the second chunk boundary

  outs = sampler.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24),
                          cancelled=cancelled)
  assert outs[1][0].finish_reason == "cancelled" and len(outs[1][0].tokens) < 24
  assert outs[0][0].finish_reason == "length" and len(outs[0][0].tokens) == 24


def test_bucket():
  assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert [bucket(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


@pytest.mark.slow
def test_sharded_sampler_matches_unsharded(params, sampler):
  from katjax.parallel import make_mesh
  mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
  sharded = Sampler(CFG, params, max_len=REF_LEN, chunk=8, stop_ids=(), mesh=mesh)
  sp = SamplingParams(temperature=0.0, max_new_tokens=8)
  for (a,), (b,) in zip(sharded.generate(PROMPTS, sp), sampler.generate(PROMPTS, sp)):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-5)


def test_ids_past_the_tokenizer_are_never_sampled(params):
  """A model padded past its tokenizer (272 ids here, a tokenizer of fewer): the sampler
  samples from the distribution restricted to the tokenizer's ids, and records that
  distribution's logprob; raw logprob and entropy stay the whole model's."""
  tok = ByteTokenizer(vocab_size=262)  # ids 262..271 have no text
  masked = Sampler(CFG, params, max_len=REF_LEN, chunk=8, tokenizer=tok, stop_ids=())
  # temperature > 1 flattens the distribution: unmasked, ~4% of the tokens would be >= 262.
  sp = SamplingParams(temperature=3.0, max_new_tokens=40)
  outs = masked.generate(PROMPTS, sp, seed=5)
  for prompt, (comp,) in zip(PROMPTS, outs):
    seq = list(prompt)
    assert comp.tokens.max() < 262
    for t, tok_id in enumerate(comp.tokens[:12]):
      logits = ref_logits(params, seq)
      lp = np_log_softmax(logits[:262] / 3.0)
      np.testing.assert_allclose(comp.logprobs[t], lp[tok_id], atol=1e-4)
      np.testing.assert_allclose(comp.raw_logprobs[t], np_log_softmax(logits)[tok_id],
                                 atol=1e-5)
      seq.append(int(tok_id))
  # Greedy picks the best id the tokenizer has, even when a padded id scores highest.
  head, best = params["lm_head"]["kernel"], int(np.argmax(ref_logits(params, PROMPTS[0])))
  boosted = dict(params, lm_head={"kernel": head.at[:, 265].set(3 * head[:, best])})
  logits = ref_logits(boosted, PROMPTS[0])
  assert np.argmax(logits) == 265
  masked.update_weights(boosted)
  (comp,), = masked.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=1))
  assert comp.tokens[0] == int(np.argmax(logits[:262]))
