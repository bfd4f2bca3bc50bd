"""Test-log parsers: a full test log -> {test id: status}, for pytest, unittest and Django.

Statuses are pytest's words: PASSED, FAILED, ERROR, SKIPPED, XFAIL, XPASS. A test seen with
several statuses keeps the worst (a printed fake "PASSED x" never hides a real failure).
Ids are what a task lists in FAIL_TO_PASS / PASS_TO_PASS:
- pytest: node ids (`tests/test_a.py::TestC::test_f[param with spaces-[1, 2]]`), read from
  the `-rA` short summary and from `-v` result lines;
- unittest (`python -m unittest -v`): dotted ids `pkg.module.Class.test_name`, from the
  verbose result lines and the `FAIL:` / `ERROR:` blocks;
- django (`tests/runtests.py --verbosity 2`): SWE-bench's `test_name (app.tests.Class)`;
  the Python 3.11+ form `test_name (app.tests.Class.test_name)` is mapped onto it, and the
  runner's migration lines (`Applying app.0001_initial... OK`) are ignored.
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = ["LOG_PARSERS", "register_log_parser", "parse_pytest_log", "parse_unittest_log",
           "parse_django_log", "STATUSES", "PASSING"]

STATUSES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")
PASSING = frozenset({"PASSED", "XFAIL"})
_RANK = {"PASSED": 0, "XFAIL": 0, "SKIPPED": 1, "XPASS": 2, "FAILED": 3, "ERROR": 3}

LOG_PARSERS: dict[str, Callable[[str], dict[str, str]]] = {}


def register_log_parser(name: str):
  """Decorator adding `fn(log) -> {test_id: status}` to the parser registry."""
  def decorate(fn):
    LOG_PARSERS[name] = fn
    return fn
  return decorate


@register_log_parser("pytest")
def parse_pytest_log(log: str) -> dict[str, str]:
  """Statuses from pytest's `-rA` summary ("FAILED id - msg") and `-v` lines ("id PASSED")."""
  out: dict[str, str] = {}
  summary = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+)$")
  verbose = re.compile(r"^(\S.*?::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                       r"(?: \(.*\))?(?: +\[ *\d+%\])?$")
  for line in log.splitlines():
    line = line.rstrip()
    m = summary.match(line)
    if m:
      status, rest = m.groups()
      if rest.startswith("["):  # "SKIPPED [1] file.py:12: reason" names a location only
        continue
      _merge(out, _pytest_id(rest), status)
      continue
    m = verbose.match(line)
    if m:
      _merge(out, m.group(1), m.group(2))
  return out


@register_log_parser("unittest")
def parse_unittest_log(log: str) -> dict[str, str]:
  """Statuses from `python -m unittest -v`, as {"module.Class.test": status}."""
  return {_dotted(name, where): s for (name, where), s in _unittest_results(log).items()}


@register_log_parser("django")
def parse_django_log(log: str) -> dict[str, str]:
  """Statuses from Django's `runtests.py --verbosity 2`, as {"test (app.tests.Class)": status}."""
  out: dict[str, str] = {}
  for (name, where), status in _unittest_results(log).items():
    cls = where[:-len(name) - 1] if where.endswith("." + name) else where
    _merge(out, f"{name} ({cls})", status)
  return out


# -- helpers ---------------------------------------------------------------------------------

def _merge(out: dict, test: str, status: str) -> None:
  if test not in out or _RANK[status] >= _RANK[out[test]]:
    out[test] = status


def _pytest_id(rest: str) -> str:
  """The node id at the start of a summary line's remainder ("id", "id - msg", "id reason").

  A node id holds spaces only inside the brackets of its parameter part (which may itself
  contain " - " and brackets), so it ends at the first space outside brackets after "::".
  """
  start = rest.find("::")
  if start < 0:  # a collection error names a file: "ERROR tests/test_a.py - ImportError"
    return rest.split(" - ", 1)[0].split(" ", 1)[0]
  depth = 0
  for i in range(start, len(rest)):
    c = rest[i]
    if c == "[":
      depth += 1
    elif c == "]":
      depth -= 1
    elif c == " " and depth <= 0:
      return rest[:i]
  return rest


_UT_HEAD = re.compile(r"^(\w+) \(([\w.]+)\)")
_UT_STATUS = re.compile(r"(?:^|\.\.\. )(ok|FAIL|ERROR|skipped(?: .*)?|expected failure|"
                        r"unexpected success)$")
_UT_BLOCK = re.compile(r"^(FAIL|ERROR|UNEXPECTED SUCCESS): (\w+) \(([\w.]+)\)")
_UT_WORD = {"ok": "PASSED", "FAIL": "FAILED", "ERROR": "ERROR", "expected failure": "XFAIL",
            "unexpected success": "XPASS"}


def _unittest_results(log: str) -> dict[tuple[str, str], str]:
  """{(test name, parenthesised location): status} from a verbose unittest-style log.

  A result line is "name (where) ... status", but a docstring's first line can stand between
  "name (where)" and " ... status", and output the test prints can push the status to a
  later line: the status belongs to the last test header seen.
  """
  out: dict[tuple[str, str], str] = {}
  current = None
  for line in log.splitlines():
    line = line.rstrip()
    block = _UT_BLOCK.match(line)
    if block:  # the failure report after the run: authoritative, and pessimistic
      kind, name, where = block.groups()
      _merge(out, (name, where), "XPASS" if kind == "UNEXPECTED SUCCESS" else
             "FAILED" if kind == "FAIL" else "ERROR")
      continue
    head = _UT_HEAD.match(line)
    if head:
      current = head.groups()
    if current is None:
      continue
    m = _UT_STATUS.search(line)
    if m and (" ... " in line or not head):
      word = m.group(1)
      _merge(out, current, "SKIPPED" if word.startswith("skipped") else _UT_WORD[word])
      current = None
  return out


def _dotted(name: str, where: str) -> str:
  return where if where.endswith("." + name) else f"{where}.{name}"
