"""Layering of katjax (DESIGN.md section 1), checked on the source with `ast`.

Every `import` and `from ... import` in every module under katjax/ counts, including the
deferred ones inside functions (they are still an import edge: they only hide a cycle or an
upward dependency until run time). The checker runs on a small synthetic graph first, so a
planted violation is shown to fail.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "katjax"

# Floors, bottom first: a module may import its own floor and those below it.
# bench/, testing/ (fixtures, benchmarks) and plan/ (the memory planner, a tool) may import
# anything below stages/.
LAYERS = (("core",), ("parallel",), ("model",), ("data",), ("train",), ("envs", "sandbox"),
          ("rollout",), ("flow",), ("bench", "testing", "plan"), ("stages", "launch"))
# Pairs a lower floor's order would allow but DESIGN.md forbids.
FORBIDDEN = {("model", "train"), ("envs", "model")}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports_of(source: str, name: str, is_package: bool, known) -> set:
  """katjax modules imported anywhere in `source` (module `name`): `from P import x` counts
  as P.x when that is a module of `known`, else as P; relative imports are resolved."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if is_package else name.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                 for a in node.names]
    else:
      continue
    out.update(t for t in targets if t == "katjax" or t.startswith("katjax."))
  out.discard(name)
  return out


def import_graph(root: pathlib.Path = ROOT, package: str = "katjax") -> dict:
  """{module: set of katjax modules it imports} over every .py file of the package."""
  files = sorted((root / package).rglob("*.py"))
  known = {module_name(f, root) for f in files}
  return {module_name(f, root): imports_of(f.read_text(), module_name(f, root),
                                           f.name == "__init__.py", known)
          for f in files}


def find_cycle(graph: dict) -> list:
  """One import cycle [a, b, ..., a] among the graph's modules, or [] if there is none."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if n not in graph:
        continue
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return []

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return []


def floor(module: str):
  """(rank, package) of a katjax module; None for the package root `katjax`."""
  parts = module.split(".")
  if len(parts) < 2:
    return None
  pkg = parts[1]
  for rank, names in enumerate(LAYERS):
    if pkg in names:
      return rank, pkg
  raise AssertionError(f"{module}: package {pkg!r} is not in the layer table; add it")


def layer_violations(graph: dict) -> list:
  """'a -> b (why)' for every import against the layer table, core purity or FORBIDDEN."""
  bad = []
  for m, deps in sorted(graph.items()):
    src = floor(m)
    for d in sorted(deps):
      dst = floor(d)
      if src is None or dst is None:
        continue
      if src[1] == "core" and dst[1] != "core":
        bad.append(f"{m} -> {d} (core imports no other katjax package)")
      elif dst[0] > src[0]:
        bad.append(f"{m} -> {d} (upward: {src[1]} is below {dst[1]})")
      elif (src[1], dst[1]) in FORBIDDEN:
        bad.append(f"{m} -> {d} ({src[1]} never imports {dst[1]})")
  return bad


# --- the checker on planted violations ------------------------------------------------------


def _write(root, files):
  for rel, text in files.items():
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_checker_finds_planted_violations(tmp_path):
  _write(tmp_path, {
      "katjax/__init__.py": "",
      "katjax/core/__init__.py": "",
      "katjax/core/a.py": "from katjax.core import b\n",
      "katjax/core/b.py": "def f():\n  from . import a  # deferred: still an edge\n",
      "katjax/core/c.py": "import katjax.train.loop\n",
      "katjax/model/m.py": "def g():\n  from katjax.train import loop\n",
      "katjax/envs/e.py": "from katjax.model import m\nfrom katjax.sandbox.s import X\n",
      "katjax/train/__init__.py": "",
      "katjax/train/loop.py": "from katjax.core.a import f\n",
      "katjax/sandbox/s.py": "X = 1\n",
  })
  graph = import_graph(tmp_path)
  assert graph["katjax.core.b"] == {"katjax.core.a"}
  assert graph["katjax.envs.e"] == {"katjax.model.m", "katjax.sandbox.s"}
  assert find_cycle(graph) == ["katjax.core.a", "katjax.core.b", "katjax.core.a"]
  assert layer_violations(graph) == [
      "katjax.core.c -> katjax.train.loop (core imports no other katjax package)",
      "katjax.envs.e -> katjax.model.m (envs never imports model)",
      "katjax.model.m -> katjax.train.loop (upward: model is below train)"]
  clean = {k: v for k, v in graph.items() if k not in ("katjax.core.b", "katjax.core.c",
                                                      "katjax.model.m", "katjax.envs.e")}
  assert find_cycle(clean) == [] and layer_violations(clean) == []


# --- the real package -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_no_import_cycle(graph):
  assert find_cycle(graph) == []


def test_layers_and_pure_core(graph):
  assert layer_violations(graph) == []


def test_core_tests_do_not_import_bench():
  files = sorted((ROOT / "tests" / "core").rglob("*.py"))
  assert files
  bad = [f.name for f in files
         if any(d == "katjax.bench" or d.startswith("katjax.bench.")
                for d in imports_of(f.read_text(), "tests", False, set()))]
  assert bad == []
