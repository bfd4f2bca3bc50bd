"""A compact byte-level BPE tokenizer trained on a corpus with the `tokenizers` library.

Byte-level, so any text encodes (nothing is out of vocabulary); the chat special tokens of
katjax.model.tokenizer are atomic added tokens. Trained on the lookup corpus a task prompt
(system text, tool schemas, question) is ~100 tokens instead of ~700 bytes, which is what
makes a tiny model's episodes cheap. Training is deterministic for a given corpus.
"""

from __future__ import annotations

import os

from katjax.model.tokenizer import BYTE_SPECIALS, Tokenizer

__all__ = ["train_bpe", "train_and_save"]


def train_bpe(texts, vocab_size: int) -> Tokenizer:
  """A katjax Tokenizer with at most `vocab_size` ids (specials included)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  minimum = 256 + len(BYTE_SPECIALS)
  if vocab_size < minimum:
    raise ValueError(f"BPE vocab_size must be >= {minimum} (bytes + specials), got "
                     f"{vocab_size}")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BYTE_SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  hf.train_from_iterator(list(texts), trainer)
  return Tokenizer(hf)


def train_and_save(texts, vocab_size: int, path: str) -> Tokenizer:
  """train_bpe, then write tokenizer.json to `path` (a file path); returns the tokenizer."""
  tok = train_bpe(texts, vocab_size)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.hf.save(path)
  return tok
