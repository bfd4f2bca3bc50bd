"""grain pipelines for mid-training and SFT: JSONL -> tokens -> packed rows -> batches.

Tokenisation and packing run once on the host (packing needs every length); the packed rows
then feed a grain `MapDataset` (shuffle by seed, repeat, per-host slice, batch) whose
iterator state (`get_state` / `set_state`) is saved with each checkpoint, so a resumed run
sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses

import grain
import jax
import numpy as np

from katjax.data.jsonl import read_jsonl, validate_chat, validate_text
from katjax.data.packing import PackStats, pack_first_fit, pack_stream, stack_rows


@dataclasses.dataclass
class PackedData:
  """Packed rows (dict of int32[N, T]) plus packing statistics and skipped-line reports."""

  rows: dict
  stats: PackStats
  errors: list

  def __len__(self):
    return len(self.rows["tokens"])


def load_mid(path: str, tokenizer, seq_len: int, *, on_error: str = "skip") -> PackedData:
  """Documents {"text"} -> encode + eos -> concatenate-and-split rows of seq_len."""
  records, errors = read_jsonl(path, validate=validate_text, on_error=on_error)
  docs = [list(tokenizer.encode(r["text"])) + [tokenizer.eos_id] for r in records]
  rows, stats = pack_stream(docs, seq_len, pad_id=tokenizer.pad_id)
  return PackedData(stack_rows(rows), stats, errors)


def load_sft(path: str, tokenizer, seq_len: int, *, on_error: str = "skip") -> PackedData:
  """Chats {"messages", "tools"?} -> encode_chat (ids, assistant mask) -> first-fit rows."""
  records, errors = read_jsonl(path, validate=validate_chat, on_error=on_error)
  examples = []
  for r in records:
    ids, mask = tokenizer.encode_chat(r["messages"], tools=r.get("tools"))
    examples.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
  rows, stats = pack_first_fit(examples, seq_len, pad_id=tokenizer.pad_id)
  return PackedData(stack_rows(rows), stats, errors)


def batch_dataset(data: PackedData, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  repeat: bool = True, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """grain MapDataset of batches (dict of int32[B_host, T]) for this host.

  `batch_size` is global; each of `process_count` hosts takes every process_count-th row
  (after the seeded shuffle) and batches batch_size / process_count of them.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if batch_size % pc:
    raise ValueError(f"global batch_size={batch_size} not divisible by {pc} hosts")
  local = batch_size // pc
  n = len(data)
  if n < batch_size:
    raise ValueError(f"dataset has {n} packed rows, fewer than one global batch of "
                     f"{batch_size}; lower data.batch_size or add data")
  rows = data.rows
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ds[pi::pc].map(lambda i: {k: v[i] for k, v in rows.items()})
  return ds.batch(local, drop_remainder=True)


def make_iterator(ds: grain.MapDataset):
  """Checkpointable iterator (`get_state()` / `set_state(state)`) over a batch dataset."""
  return iter(ds.to_iter_dataset())
