"""Packing: no attention across documents (through the model), SFT loss == per-chat loss."""

import functools

import jax
import numpy as np
import pytest

from katjax import model as km
from katjax.data import pack_first_fit, pack_stream, sft_records, stack_rows
from katjax.model.tokenizer import ByteTokenizer
from katjax.train.losses import lm_loss

CFG = km.TINY.replace(vocab_size=272)


@pytest.fixture(scope="module")
def params():
  return km.init(CFG, jax.random.PRNGKey(0))


def _docs(seed, n, lo, hi):
  rs = np.random.RandomState(seed)
  return [rs.randint(0, 256, size=rs.randint(lo, hi)).astype(np.int32) for _ in range(n)]


def test_packed_logits_equal_each_document_alone(params):
  docs = _docs(0, 7, 5, 40)
  rows, stats = pack_first_fit([(d, np.ones_like(d)) for d in docs], 64)
  batch = stack_rows(rows)
  logits = np.asarray(km.apply(CFG, params, batch["tokens"], batch["positions"],
                               batch["subtree_end"]))
  # Scramble every token outside one segment: that segment's logits must not move.
  seen = 0
  for r in range(len(rows)):
    for seg in range(1, batch["segment_ids"][r].max() + 1):
      idx = np.nonzero(batch["segment_ids"][r] == seg)[0]
      alone = np.zeros((1, 64), np.int32)  # fixed shape: one compile; end padding is inert
      alone[0, :idx.size] = batch["tokens"][r, idx]
      alone = np.asarray(km.apply(CFG, params, alone))[0, :idx.size]
      np.testing.assert_allclose(logits[r, idx], alone, rtol=2e-5, atol=2e-5)
      other = batch["tokens"][r:r + 1].copy()
      mask = batch["segment_ids"][r] != seg
      other[0, mask] = (other[0, mask] + 17) % 256
      moved = np.asarray(km.apply(CFG, params, other, batch["positions"][r:r + 1],
                                  batch["subtree_end"][r:r + 1]))[0]
      np.testing.assert_allclose(moved[idx], logits[r, idx], rtol=2e-5, atol=2e-5)
      seen += 1
  assert seen == len(docs) and stats.split == 0
  # never predicts across a boundary; padding sees only itself
  for r in range(len(rows)):
    seg, w, se = batch["segment_ids"][r], batch["weights"][r], batch["subtree_end"][r]
    nxt = np.append(seg[1:], 0)
    assert np.all(w[(seg != nxt) | (seg == 0)] == 0)
    pad = np.nonzero(seg == 0)[0]
    np.testing.assert_array_equal(se[pad], pad + 1)


def test_stream_packing_splits_long_documents_and_counts():
  docs = [np.arange(10, dtype=np.int32), np.arange(50, dtype=np.int32) % 256,
          np.arange(7, dtype=np.int32)]
  rows, stats = pack_stream(docs, 16)
  assert stats.split == 1 and stats.sequences == 3 and stats.tokens == 67
  batch = stack_rows(rows)
  flat = batch["tokens"][batch["segment_ids"] > 0]
  np.testing.assert_array_equal(flat, np.concatenate(docs))  # order kept, nothing lost
  assert len(rows) == 5 and np.isclose(stats.efficiency, 67 / 80)
  for r in range(len(rows)):  # positions restart in each segment
    for seg in range(1, batch["segment_ids"][r].max() + 1):
      idx = np.nonzero(batch["segment_ids"][r] == seg)[0]
      np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(idx.size))
      assert np.all(batch["subtree_end"][r, idx] == idx[-1] + 1)


def test_first_fit_splits_and_fills():
  ex = [(np.arange(n, dtype=np.int32), np.ones(n, np.int32)) for n in (30, 12, 20, 45, 3)]
  rows, stats = pack_first_fit(ex, 32)
  assert stats.split == 1  # the 45-token one
  assert stats.tokens == 110 and len(rows) == 4  # pieces 32,30,20,13,12,3 -> 4 bins of 32
  with pytest.raises(ValueError, match="seq_len"):
    pack_first_fit(ex, 1)


def test_sft_loss_equals_per_conversation_loss(params):
  tok = ByteTokenizer()
  chats = [c for c in sft_records(12, seed=3)][:8]
  examples = [tuple(np.asarray(a) for a in tok.encode_chat(c["messages"], tools=c.get("tools")))
              for c in chats]
  rows, stats = pack_first_fit(examples, 1536)
  assert stats.split == 0 and len(rows) < len(examples)  # really packed
  batch = stack_rows(rows)
  loss_sum, count, _ = jax.jit(functools.partial(lm_loss, CFG))(params, batch)
  ref_sum, ref_count = 0.0, 0.0
  flat = np.zeros((len(examples), 1536), np.int32)  # one causal row per chat, end-padded
  for i, (ids, _) in enumerate(examples):
    flat[i, :len(ids)] = ids
  all_logits = np.asarray(km.apply(CFG, params, flat), np.float64)
  for i, (ids, mask) in enumerate(examples):  # flat, unpacked reference, NumPy log-softmax
    logits = all_logits[i, :len(ids)]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref_sum -= np.sum(mask[1:] * logp[np.arange(len(ids) - 1), ids[1:]])
    ref_count += mask[1:].sum()
  assert float(count) == ref_count == stats.loss_tokens
  np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-5)
