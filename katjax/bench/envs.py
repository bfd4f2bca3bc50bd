"""SWE episode throughput per sandbox backend at 1, 4 and 16 concurrent episodes.

`python -m katjax.bench.envs` prints one JSON object: per backend ("local", "docker") and
concurrency, episodes per minute and the p50 / p99 latency of the sandbox commands, and
Docker's 16-over-1 speed-up; Docker is null with the reason where it is unusable.

What an episode is (the honest part): the SWE env on a one-bug git repo made here (the fix
is one edit; its test_patch adds the failing test). Per episode: lease a warm sandbox from
a `SandboxPool` (size = concurrency; the pool is filled before timing, so no episode pays
a container start), check the repo out, then `--turns` agent turns, each a simulated model
call of `--think` seconds (a sleep standing in for LLM generation latency, which dominates
real agent turns) followed by one real bash command in the sandbox; then the fix through
the edit tool, submit, and grading in a reset pooled sandbox (checkout, patches, pytest,
parse). Every episode must be resolved. Concurrency is threads, one env each, as a rollout
worker runs them; with episodes dominated by waiting, throughput scales with concurrency
until the host's cores are busy with the commands and the grading.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import tempfile
import time

import numpy as np

from katjax.envs import ToolCall, make_env

__all__ = ["main", "episode_throughput", "make_bench_task", "COMMANDS"]

COMMANDS = ["ls", "git status --short", "cat calc/__init__.py", "grep -n 'def ' calc/__init__.py",
            "python3 -c 'import calc; print(calc.add(2, 3))'", "wc -l calc/__init__.py",
            "git log --oneline | head -3", "ls tests", "head -3 tests/test_calc.py", "pwd"]


def episode_throughput(backend: str, task: dict, concurrency: int, episodes: int,
                       turns: int = 10, think: float = 1.0) -> dict:
  """{"episodes_per_min", "cmd_p50_ms", "cmd_p99_ms", "episodes"} for one setting."""
  from katjax.sandbox.pool import SandboxPool
  latencies: list[float] = []
  with SandboxPool(backend, size=concurrency) as pool:
    leases = [pool.acquire() for _ in range(concurrency)]  # fill the pool: warm sandboxes
    for sb in leases:
      pool.release(sb)

    def one(i):
      env = make_env("swe", backend=backend, test_timeout=120, pool=pool)
      try:
        env.reset(task)
        for t in range(turns):
          time.sleep(think)
          call = ToolCall(str(t), "bash", {"command": COMMANDS[(i + t) % len(COMMANDS)]})
          start = time.monotonic()
          env.step([call])
          latencies.append(time.monotonic() - start)
        time.sleep(think)
        env.step([ToolCall("e", "edit", {"path": "calc/__init__.py", "old_str": "a - b",
                                         "new_str": "a + b"})])
        env.step([ToolCall("s", "submit", {})])
        reward, info = env.evaluate()
      finally:
        env.close()
      if reward != 1.0:
        raise RuntimeError(f"bench episode not resolved: {info.get('error')}")

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
      list(ex.map(one, range(episodes)))
    elapsed = time.monotonic() - start
  lat = np.asarray(latencies) * 1e3
  return {"episodes_per_min": round(episodes / elapsed * 60.0, 2), "episodes": episodes,
          "cmd_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
          "cmd_p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None}


def make_bench_task(root: str) -> dict:
  """A one-bug git repo (add uses -) with gold patch and test patch, as an SWE task."""
  repo = os.path.join(root, "calc")
  env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
             GIT_COMMITTER_EMAIL="b@b")

  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True,
                          text=True, env=env).stdout

  os.makedirs(os.path.join(repo, "calc"))
  os.makedirs(os.path.join(repo, "tests"))
  _write(repo, "calc/__init__.py", "def add(a, b):\n    return a - b\n")
  _write(repo, "tests/test_calc.py", "from calc import add\n\n\ndef test_zero():\n"
         "    assert add(0, 0) == 0\n")
  git("init", "-q")
  git("add", "-A")
  git("commit", "-q", "-m", "base")
  base = git("rev-parse", "HEAD").strip()
  _write(repo, "tests/test_calc.py", "from calc import add\n\n\ndef test_zero():\n"
         "    assert add(0, 0) == 0\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
  test_patch = git("diff")
  git("checkout", "-q", "--", ".")
  return {"repo": "bench/calc", "repo_path": repo, "instance_id": "bench__calc-1",
          "base_commit": base, "problem_statement": "add is wrong", "test_patch": test_patch,
          "FAIL_TO_PASS": ["tests/test_calc.py::test_add"],
          "PASS_TO_PASS": ["tests/test_calc.py::test_zero"]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backends", nargs="+", default=["local", "docker"])
  parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
  parser.add_argument("--rounds", type=int, default=2,
                      help="episodes per measurement = rounds x concurrency")
  parser.add_argument("--episodes", type=int, default=0,
                      help="episodes per measurement (>= concurrency); overrides --rounds")
  parser.add_argument("--turns", type=int, default=10, help="bash turns per episode")
  parser.add_argument("--think", type=float, default=1.0,
                      help="simulated model latency per turn, seconds")
  args = parser.parse_args(argv)
  from katjax.sandbox.docker import docker_available
  result: dict = {"episode": f"{args.turns} turns of ({args.think:g}s simulated model call + "
                  "1 bash command), 1 edit, submit, graded (pytest) in a pooled sandbox",
                  "cpus": os.cpu_count()}
  with tempfile.TemporaryDirectory() as root:
    task = make_bench_task(root)
    for backend in args.backends:
      if backend == "docker":
        ok, why = docker_available()
        if not ok:
          result["docker"], result["docker_skipped"] = None, why
          continue
      result[backend] = {str(c): episode_throughput(
        backend, task, c, max(c, args.episodes) if args.episodes else args.rounds * c,
        args.turns, args.think) for c in args.concurrency}
  for backend in args.backends:
    runs = result.get(backend) or {}
    lo, hi = str(min(args.concurrency)), str(max(args.concurrency))
    if lo in runs and hi in runs and lo != hi:
      result[f"{backend}_speedup_{hi}_over_{lo}"] = round(
        runs[hi]["episodes_per_min"] / runs[lo]["episodes_per_min"], 2)
  print(json.dumps(result))
  return result


def _write(repo, path, text):
  with open(os.path.join(repo, path), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
