"""Packing token sequences into fixed [T] rows whose attention never crosses a document.

A packed row is a dict of int32[T] arrays:
  tokens, positions (restart at 0 in every segment), subtree_end (one past the segment's
  last index: the interval mask of DESIGN.md section 2; padding gets i + 1), segment_ids
  (1, 2, ... per segment, 0 on padding), targets (tokens[i + 1]) and weights (1 where the
  loss is taken at i: the target lies in the same segment and is a trainable token).
So a token never predicts across a segment boundary: that is a property of the data, and
the loss function just reads `targets` and `weights`.

Mid-training concatenates documents and splits the stream into rows; SFT packs whole
conversations first-fit (by length, descending). A sequence longer than T is split into
pieces of at most T tokens (each its own segment), and counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ROW_KEYS = ("tokens", "positions", "subtree_end", "segment_ids", "targets", "weights")


@dataclasses.dataclass
class PackStats:
  """Counts reported by the packers; efficiency = real tokens / row slots."""

  seq_len: int = 1
  sequences: int = 0
  split: int = 0  # sequences longer than T that were cut into pieces
  rows: int = 0
  tokens: int = 0  # non-padding tokens placed
  loss_tokens: int = 0
  dropped: int = 0  # pieces of split sequences with nothing to train on

  @property
  def efficiency(self) -> float:
    return self.tokens / max(1, self.rows * self.seq_len)


def pack_stream(docs, seq_len: int, pad_id: int = 0):
  """Mid-training packing. docs: list of int[n] (eos already appended) -> (rows, PackStats).

  Documents are laid end to end and the stream is cut every T tokens; a document cut by a
  row boundary continues as a new segment (positions from 0) in the next row. Every token
  whose successor is in the same segment is trained on.
  """
  _check_len(seq_len)
  stats = PackStats(seq_len=seq_len)
  rows, cur = [], []
  free = seq_len
  for doc in docs:
    doc = np.asarray(doc, np.int32)
    if doc.size == 0:
      continue
    stats.sequences += 1
    if doc.size > seq_len:
      stats.split += 1
    while doc.size:
      piece, doc = doc[:free], doc[free:]
      cur.append((piece, np.ones(piece.size, np.int32)))
      free -= piece.size
      if free == 0:
        rows.append(_build_row(cur, seq_len, pad_id, stats))
        cur, free = [], seq_len
  if cur:
    rows.append(_build_row(cur, seq_len, pad_id, stats))
  return rows, stats


def pack_first_fit(examples, seq_len: int, pad_id: int = 0):
  """SFT packing. examples: list of (ids int[n], loss_mask int[n]) -> (rows, PackStats).

  `loss_mask[j] = 1` marks token j as a training target (assistant tokens). Sequences are
  placed longest first into the first row with room (deterministic for a given input order).
  """
  _check_len(seq_len)
  stats = PackStats(seq_len=seq_len)
  pieces = []
  for ids, mask in examples:
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if ids.shape != mask.shape:
      raise ValueError(f"pack_first_fit: ids {ids.shape} and loss_mask {mask.shape} differ")
    if ids.size == 0:
      continue
    stats.sequences += 1
    if ids.size > seq_len:
      stats.split += 1
    for s in range(0, ids.size, seq_len):
      piece = (ids[s:s + seq_len], mask[s:s + seq_len])
      if ids.size > seq_len and not piece[1][1:].any():
        stats.dropped += 1  # a piece of a split chat with no assistant target in it
        continue
      pieces.append(piece)
  order = sorted(range(len(pieces)), key=lambda i: (-pieces[i][0].size, i))
  bins, free = [], []
  for i in order:
    n = pieces[i][0].size
    for b, room in enumerate(free):
      if room >= n:
        bins[b].append(pieces[i])
        free[b] -= n
        break
    else:
      bins.append([pieces[i]])
      free.append(seq_len - n)
  return [_build_row(b, seq_len, pad_id, stats) for b in bins], stats


def stack_rows(rows) -> dict:
  """list of row dicts -> dict of int32[N, T] arrays."""
  return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in ROW_KEYS}


def _build_row(segments, seq_len, pad_id, stats):
  row = {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS}
  row["tokens"][:] = pad_id
  idx = np.arange(seq_len, dtype=np.int32)
  row["subtree_end"][:] = idx + 1  # padding sees only itself
  start = 0
  for seg, (ids, mask) in enumerate(segments, start=1):
    n = ids.size
    end = start + n
    row["tokens"][start:end] = ids
    row["positions"][start:end] = np.arange(n, dtype=np.int32)
    row["subtree_end"][start:end] = end
    row["segment_ids"][start:end] = seg
    row["targets"][start:end - 1] = ids[1:]
    row["weights"][start:end - 1] = mask[1:]
    start = end
  stats.rows += 1
  stats.tokens += start
  stats.loss_tokens += int(row["weights"].sum())
  return row


def _check_len(seq_len):
  if not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
