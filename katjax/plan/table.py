"""The plan of a config over several meshes: per-device memory, largest row, fit table."""

from __future__ import annotations

import dataclasses
import math

from katjax.plan.memory import (GIB, Memory, decode_memory, largest_row, row_multiple,
                                tree_step_memory)

# Per-device memory budgets (GiB) the table is checked against.
DEVICES = {"TPU v5p": 95, "H200": 141, "H100": 80}


@dataclasses.dataclass
class MeshPlan:
  mesh: tuple  # (data, fsdp, tensor), then sequence when it is > 1
  row_tokens: int
  train: Memory  # tree step at row_tokens
  train_half: Memory  # tree step at row_tokens // 2 (for the linear fit)
  decode: Memory
  decode_batch: int
  cache_len: int
  largest: dict  # device name -> largest row that fits its budget

  def fits(self, device: str) -> bool:
    budget = DEVICES[device] * GIB
    return self.train.peak <= budget and self.decode.peak <= budget


def plan_mesh(cfg, mesh, *, row_tokens: int, micro_batches: int = 1, decode_batch: int,
              cache_len: int, optimizer=None, loss_cfg=None, devices=DEVICES) -> MeshPlan:
  """Compile the tree step at row_tokens and row_tokens // 2 and the decode step on `mesh`.

  With a `sequence` axis of n > 1 devices each row is split over them (context parallelism),
  so both row lengths must be multiples of n, and so is the largest row reported.
  """
  shape = tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor"))
  n = mesh.shape.get("sequence", 1)
  if n > 1:
    shape += (n,)
  rows = shape[0] * shape[1] * micro_batches  # one row per batch shard per micro-batch
  kw = dict(optimizer=optimizer, loss_cfg=loss_cfg, micro_batches=micro_batches)
  half = max(row_tokens // 2, 1)
  if row_tokens % n or half % n:
    raise ValueError(f"plan: row_tokens={row_tokens} and its half {half} must be multiples "
                     f"of the mesh's sequence axis of {n} devices")
  train = tree_step_memory(cfg, mesh, rows, row_tokens, **kw)
  train_half = tree_step_memory(cfg, mesh, rows, half, **kw)
  decode = decode_memory(cfg, mesh, decode_batch, cache_len)
  multiple = row_multiple(cfg, n, half)  # whole blocks on every sequence part
  largest = {name: largest_row([(half, train_half.peak), (row_tokens, train.peak)],
                               gib * GIB, multiple) for name, gib in devices.items()}
  return MeshPlan(shape, row_tokens, train, train_half, decode, decode_batch, cache_len,
                  largest)


def format_plan(plans, devices=DEVICES) -> str:
  """Per-device memory of each mesh, then the fit table (markdown)."""
  g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
  lines = []
  for p in plans:
    t, d = p.train, p.decode
    lines.append(
        f"mesh data={p.mesh[0]} fsdp={p.mesh[1]} tensor={p.mesh[2]}"
        + (f" sequence={p.mesh[3]}" if len(p.mesh) > 3 else "") + ": tree step, row of "
        f"{p.row_tokens} tokens: params {g(t.params)} GiB, optimizer {g(t.optimizer)} GiB, "
        f"arguments {g(t.arguments)}, temporaries {g(t.temporaries)} (at {p.row_tokens // 2}"
        f": {g(p.train_half.temporaries)}), peak {g(t.peak)} GiB per device; decode "
        f"({p.decode_batch} rows x {p.cache_len} cache): params {g(d.params)}, cache+args "
        f"{g(d.arguments - d.params)}, temporaries {g(d.temporaries)}, peak {g(d.peak)} GiB")
  names = list(devices)
  lines += ["", "| mesh (data, fsdp, tensor[, sequence]) | devices | tree step peak GiB | "
            "decode peak GiB | "
            + " | ".join(f"{n} ({devices[n]} GiB): fits / largest row" for n in names) + " |",
            "|" + "---|" * (4 + len(names))]
  for p in plans:
    cells = [f"{'yes' if p.fits(n) else 'no'} / {p.largest[n]}" for n in names]
    lines.append(f"| {p.mesh} | {math.prod(p.mesh)} | {g(p.train.peak)} | "
                 f"{g(p.decode.peak)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def check_row_fits(plans, device: str, devices=DEVICES) -> None:
  """ValueError when the planned row does not fit `device` on a mesh, with the largest."""
  if device not in devices:
    raise ValueError(f"--device={device!r}: known {sorted(devices)}")
  for p in plans:
    if p.train.peak > devices[device] * GIB:
      raise ValueError(
          f"a tree row of {p.row_tokens} tokens does not fit mesh {p.mesh} on {device} "
          f"({devices[device]} GiB per device): the tree step peaks at "
          f"{p.train.peak / GIB:.1f} GiB; the largest row that fits is {p.largest[device]} "
          f"tokens (or use more fsdp / tensor devices, or split rows over more sequence "
          f"devices)")
