"""SWE-smith style single-site mutations of a Python module (the bug synthesis operators).

Shared by `swe_data.synthesize` (the bundled mini repo) and `swe_real.build_tasks` (real
libraries' source distributions): flip an operator, off-by-one, drop or negate a branch,
swap two call arguments.
"""

from __future__ import annotations

import ast


def mutations(source: str) -> list[tuple[str, int, str]]:
  """Every single-site mutation of a module: (kind, line, mutated source). Deterministic."""
  tree = ast.parse(source)
  lines = source.splitlines(keepends=True)
  out = []
  swaps = {ast.Add: "-", ast.Sub: "+", ast.Mult: "//", ast.Lt: "<=", ast.LtE: "<",
           ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "=="}
  symbols = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Lt: "<", ast.LtE: "<=",
             ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
  for node in ast.walk(tree):
    if isinstance(node, ast.BinOp) and type(node.op) in swaps:
      pair = (node.left, node.right, type(node.op))
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in swaps:
      pair = (node.left, node.comparators[0], type(node.ops[0]))
    else:
      pair = None
    if pair and pair[0].end_lineno == pair[1].lineno:
      left, right, op = pair
      line = lines[left.end_lineno - 1]
      gap = line[left.end_col_offset:right.col_offset]
      if gap.strip() == symbols[op]:
        gap = gap.replace(symbols[op], swaps[op])
        new = line[:left.end_col_offset] + gap + line[right.col_offset:]
        out.append(("flip_operator", left.end_lineno, _replace_line(lines, left.end_lineno, new)))
    if (isinstance(node, ast.Constant) and type(node.value) is int
        and node.lineno == node.end_lineno):
      line = lines[node.lineno - 1]
      new = line[:node.col_offset] + str(node.value + 1) + line[node.end_col_offset:]
      out.append(("off_by_one", node.lineno, _replace_line(lines, node.lineno, new)))
    if isinstance(node, ast.If) and node.test.lineno == node.test.end_lineno:
      line = lines[node.test.lineno - 1]
      t0, t1 = node.test.col_offset, node.test.end_col_offset
      new = line[:t0] + "False" + line[t1:]
      out.append(("drop_branch", node.lineno, _replace_line(lines, node.test.lineno, new)))
      new = line[:t0] + f"not ({line[t0:t1]})" + line[t1:]
      out.append(("negate_condition", node.lineno, _replace_line(lines, node.test.lineno, new)))
    if (isinstance(node, ast.Call) and len(node.args) >= 2 and node.lineno == node.end_lineno
        and not any(isinstance(a, ast.Starred) for a in node.args[:2])):
      a, b = node.args[:2]
      line = lines[node.lineno - 1]
      sa, sb = line[a.col_offset:a.end_col_offset], line[b.col_offset:b.end_col_offset]
      if sa != sb and a.end_col_offset <= b.col_offset:
        new = line[:a.col_offset] + sb + line[a.end_col_offset:b.col_offset] + sa \
          + line[b.end_col_offset:]
        out.append(("swap_args", node.lineno, _replace_line(lines, node.lineno, new)))
  return sorted(out, key=lambda m: (m[1], m[0], m[2]))


def _replace_line(lines: list[str], lineno: int, new: str) -> str:
  return "".join(lines[:lineno - 1] + [new] + lines[lineno:])
