"""The env benchmark runs a resolved episode end to end (local backend, one episode)."""

from katjax.bench.envs import episode_throughput, make_bench_task


def test_bench_episode_local(tmp_path):
  task = make_bench_task(str(tmp_path))
  assert episode_throughput("local", task, concurrency=1, episodes=1) > 0
