"""Test setup: CPU with 8 fake devices (set before JAX initialises its backend)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402


def _lcs_length(a, b) -> int:
  """Plain-Python dynamic programme: length of the longest common subsequence."""
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      table[i][j] = (table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1]
                     else max(table[i - 1][j], table[i][j - 1]))
  return table[-1][-1]


@pytest.fixture(scope="session")
def lcs_ref():
  """The independent LCS reference the RFT similarity tests compare against."""
  return _lcs_length
