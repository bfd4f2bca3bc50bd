"""Flax decoder (Llama / Qwen2 / Qwen3) with the interval attention mask."""

from katjax.model.api import (apply, forward, forward_with_cache, hidden_states, init,
                              init_cache, logical_axes, param_shapes, validate_subtree_end,
                              validate_tokens)
from katjax.model.attention import blockwise_attention, dense_attention, visible
from katjax.model.config import TINY, ModelConfig
from katjax.model.gguf import from_gguf
from katjax.model.hf import from_hf, to_hf
from katjax.model.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "ModelConfig", "TINY", "init", "apply", "forward", "hidden_states", "forward_with_cache",
    "init_cache",
    "logical_axes", "param_shapes", "validate_tokens", "validate_subtree_end",
    "dense_attention", "blockwise_attention", "visible", "Tokenizer", "ByteTokenizer",
    "from_hf", "to_hf", "from_gguf",
]
