"""Log parsers on real logs (pytest -rA / -v and unittest -v runs of the sample suites in
tests/envs/swe_logs) and on a Django runner log written from its documented format.

The expected statuses come from the sample suites' source (which test was written to pass,
fail, error, skip, xfail, xpass), not from the parser.
"""

import os

import pytest

from katjax.envs.swe_parsers import (LOG_PARSERS, parse_django_log, parse_pytest_log,
                                     parse_unittest_log)

LOGS = os.path.join(os.path.dirname(__file__), "swe_logs")

# From swe_logs/sample_pytest_suite.py.txt: ids as pytest builds them (spaces, " - " and
# brackets inside parameter ids; a tab escaped as backslash-t).
PYTEST_EXPECTED = {
  "test_real.py::test_spaces[a b]": "PASSED",
  "test_real.py::test_spaces[x - y]": "PASSED",
  "test_real.py::test_spaces[[1, 2]]": "PASSED",
  "test_real.py::test_spaces[tab\\tand ][]": "PASSED",
  "test_real.py::test_equal[one - two]": "FAILED",
  "test_real.py::test_equal[three [3]]": "PASSED",
  "test_real.py::TestGroup::test_ok": "PASSED",
  "test_real.py::TestGroup::test_broken": "FAILED",
  "test_real.py::test_uses_bad_fixture": "ERROR",
  "test_real.py::test_xfail": "XFAIL",
  "test_real.py::test_xpass": "XPASS",
  "test_real.py::test_prints_fake_line": "FAILED",
}


def _read(name):
  with open(os.path.join(LOGS, name)) as f:
    return f.read()


@pytest.mark.parametrize("name", ["pytest_rA.log", "pytest_v.log"])
def test_pytest_real_logs(name):
  got = parse_pytest_log(_read(name))
  for test, status in PYTEST_EXPECTED.items():
    assert got.get(test) == status, (test, got.get(test))
  if name == "pytest_v.log":  # -v names skipped tests; -rA gives only their location
    assert got["test_real.py::test_skipped"] == "SKIPPED"
  # The line the failing test printed names a test that does not exist: harmless, and it
  # cannot make a real test pass.
  assert set(got) - set(PYTEST_EXPECTED) <= {"test_real.py::test_skipped",
                                             "test_real.py::test_broken_print"}


def test_pytest_fake_pass_line_cannot_hide_a_failure():
  log = _read("pytest_rA.log") + "\nPASSED test_real.py::TestGroup::test_broken\n"
  assert parse_pytest_log(log)["test_real.py::TestGroup::test_broken"] == "FAILED"


def test_unittest_real_log():
  assert parse_unittest_log(_read("unittest_v.log")) == {
    "pkg.test_ut.Arith.test_add": "PASSED",
    "pkg.test_ut.Arith.test_doc": "PASSED",            # docstring line before "... ok"
    "pkg.test_ut.Arith.test_prints": "PASSED",         # "ok" pushed to the next line
    "pkg.test_ut.Arith.test_error": "ERROR",
    "pkg.test_ut.Arith.test_sub_fails": "FAILED",
    "pkg.test_ut.Arith.test_subtests": "FAILED",       # one failing subTest fails the test
    "pkg.test_ut.Arith.test_skip": "SKIPPED",
    "pkg.test_ut.Arith.test_xfail": "XFAIL",
    "pkg.test_ut.Arith.test_xpass": "XPASS",
  }


def test_django_log_in_swebench_ids():
  assert parse_django_log(_read("django_v2.log")) == {
    "test_add_view (admin_views.tests.AdminViewBasicTest)": "PASSED",
    "test_changelist_view (admin_views.tests.AdminViewBasicTest)": "PASSED",
    "test_history_view (admin_views.tests.AdminViewBasicTest)": "FAILED",
    "test_ticket_7302 (queries.tests.Queries1Tests)": "ERROR",
    "test_distinct_on (queries.tests.Queries1Tests)": "SKIPPED",
    "test_printing (queries.tests.Queries1Tests)": "PASSED",
    "test_known_bug (queries.tests.Queries1Tests)": "XFAIL",
    "test_new_style_id (queries.tests.Queries2Tests)": "PASSED",  # 3.11+ form mapped
    "test_exists (queries.tests.ExistsSql)": "FAILED",
  }


def test_registry_names():
  assert {"pytest", "unittest", "django"} <= set(LOG_PARSERS)
