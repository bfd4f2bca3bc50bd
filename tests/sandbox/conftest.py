"""Sandbox backends as a fixture parameter; Docker ones skip with the reason when unusable."""

import pytest

from katjax.sandbox import make_sandbox


def backend_params():
  """pytest params for ("local", "docker"), the docker one marked and skipped if needed."""
  from katjax.sandbox.docker import docker_available
  ok, why = docker_available()
  return [pytest.param("local", id="local"),
          pytest.param("docker", id="docker", marks=[pytest.mark.docker] + (
            [] if ok else [pytest.mark.skip(reason=f"Docker sandbox unavailable: {why}")]))]


@pytest.fixture(scope="module", params=backend_params())
def sandbox(request):
  sb = make_sandbox(request.param, memory_mb=512, pids_limit=64) if request.param == "docker" \
    else make_sandbox(request.param, memory_mb=512, max_procs=64)
  yield sb
  sb.close()
