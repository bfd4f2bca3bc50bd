"""Logical axis rules, declared once as data: logical name -> mesh axes.

Code names logical axes only (`("embed", "mlp")`, `("batch", "length")`); this table decides
how they map onto the mesh axes `data`, `fsdp`, `sequence`, `tensor`. A mesh axis that does
not divide a dimension is dropped for that array (replicated instead of erroring), so one
rule set serves every model size and mesh shape.
"""

from __future__ import annotations

# Device order: tensor innermost (the most traffic, the fastest links), then sequence (the
# ring of `katjax.model.ring_attention` talks to its neighbour), fsdp, data outermost.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations / batches
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),  # a tree row's tokens (context parallelism; default size 1)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
)


def mesh_axes_for(logical: str | None, rules=DEFAULT_RULES) -> tuple[str, ...]:
  """Mesh axes a logical axis maps to (empty tuple: replicated)."""
  if logical is None:
    return ()
  for name, target in rules:
    if name == logical:
      if target is None:
        return ()
      return (target,) if isinstance(target, str) else tuple(target)
  raise ValueError(f"logical axis {logical!r} has no rule; known: {[n for n, _ in rules]}")
