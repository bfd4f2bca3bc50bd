"""grain data pipelines: JSONL sources, packing into interval-masked rows, embedded data."""

from katjax.data.jsonl import read_jsonl, validate_chat, validate_text
from katjax.data.packing import PackStats, pack_first_fit, pack_stream, stack_rows
from katjax.data.pipeline import PackedData, batch_dataset, load_mid, load_sft, make_iterator
from katjax.data.synthetic import mid_records, sft_records, write_default_data

__all__ = ["read_jsonl", "validate_chat", "validate_text", "PackStats", "pack_first_fit",
           "pack_stream", "stack_rows", "PackedData", "batch_dataset", "load_mid", "load_sft",
           "make_iterator", "mid_records", "sft_records", "write_default_data"]
