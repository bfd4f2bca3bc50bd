"""The env benchmark runs resolved episodes end to end from a warm pool (local backend)."""

from katjax.bench.envs import main


def test_bench_envs_local_small():
  out = main(["--backends", "local", "--concurrency", "1", "2", "--rounds", "1",
              "--turns", "2", "--think", "0"])
  assert set(out["local"]) == {"1", "2"}
  for run in out["local"].values():
    assert run["episodes_per_min"] > 0 and 0 < run["cmd_p50_ms"] <= run["cmd_p99_ms"]
  assert out["local"]["2"]["episodes"] == 2
  assert out["local_speedup_2_over_1"] > 0
