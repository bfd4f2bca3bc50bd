"""Ahead-of-time memory planning: will a config fit a mesh? (`python -m katjax.plan`)."""

from katjax.plan.memory import (GIB, Memory, abstract_params, abstract_train_state,
                                decode_memory, device_memory_budget, fit_tree_step,
                                largest_fitting_row, largest_row, shard_bytes,
                                tree_step_memory)

__all__ = ["GIB", "Memory", "abstract_params", "abstract_train_state", "decode_memory",
           "device_memory_budget", "fit_tree_step", "largest_fitting_row", "largest_row", "shard_bytes",
           "tree_step_memory"]
