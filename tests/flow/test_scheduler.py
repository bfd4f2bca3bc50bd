"""Tag-driven scheduler: tags respected, slots never exceeded, multi-tag resources shared."""

import os
import threading
import time

import pytest

from katjax.flow.scheduler import Resource, ThreadScheduler, RayScheduler, ray_resources


def _max_overlap(spans):
  events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
  best = cur = 0
  for _, d in events:
    cur += d
    best = max(best, cur)
  return best


def _job(sched, tags_and_counts, seconds=0.05):
  spans = {t: [] for t, _ in tags_and_counts}

  def work(tag):
    start = time.time()
    time.sleep(seconds)
    spans[tag].append((start, time.time()))
    return tag

  futures = [sched.submit(t, work, t) for t, n in tags_and_counts for _ in range(n)]
  assert [f.result(timeout=60) for f in futures] == [t for t, n in tags_and_counts
                                                     for _ in range(n)]
  return spans


def test_tags_and_slots_are_respected_and_shared_resources_multiplex():
  sched = ThreadScheduler([Resource("trainer", {"train", "rollout"}),
                           Resource("engine", {"rollout"}, slots=2)])
  try:
    spans = _job(sched, [("rollout", 9), ("train", 3)])
    tasks = sched.usage()["tasks"]
  finally:
    sched.shutdown()
  assert "engine/train" not in tasks and tasks["trainer/train"] == 3
  assert tasks["trainer/rollout"] >= 1  # the idle trainer served rollouts
  assert tasks.get("engine/rollout", 0) + tasks["trainer/rollout"] == 9
  assert _max_overlap(spans["train"]) == 1  # one train slot
  assert _max_overlap(spans["rollout"] + spans["train"]) <= 3  # three slots in all
  assert _max_overlap(spans["rollout"]) == 3  # rollouts used the trainer's slot too


def test_train_goes_before_queued_rollouts():
  sched = ThreadScheduler([Resource("shared", {"train", "rollout"})])
  order, gate = [], threading.Event()
  try:
    first = sched.submit("rollout", gate.wait, 30)   # occupies the only slot
    rest = [sched.submit("rollout", order.append, "rollout") for _ in range(3)]
    train = sched.submit("train", order.append, "train")
    gate.set()
    for f in [first, train, *rest]:
      f.result(timeout=30)
  finally:
    sched.shutdown()
  assert order[0] == "train"


def test_bad_input_and_errors():
  with pytest.raises(ValueError, match="no tags"):
    Resource("x", set())
  with pytest.raises(ValueError, match="unique"):
    ThreadScheduler([Resource("a", {"train"}), Resource("a", {"rollout"})])
  sched = ThreadScheduler([Resource("a", {"train"})])
  try:
    with pytest.raises(ValueError, match="'env'"):
      sched.submit("env", print)
    boom = sched.submit("train", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
      boom.result(timeout=10)
    assert sched.submit("train", lambda: 7).result(timeout=10) == 7  # the slot came back
  finally:
    sched.shutdown()


@pytest.mark.slow
def test_ray_backend_runs_the_same_job_on_a_local_instance():
  ray = pytest.importorskip("ray")
  resources = [Resource("trainer", {"train", "rollout"}), Resource("engine", {"rollout"}, 2)]
  ray.init(num_cpus=2, resources=ray_resources(resources), include_dashboard=False,
           log_to_driver=False, configure_logging=False)
  try:
    sched = RayScheduler(resources)
    results = [sched.submit("rollout", pow, 2, k) for k in range(6)]
    results.append(sched.submit("train", sum, [1, 2, 3]))
    assert [f.result(timeout=120) for f in results] == [1, 2, 4, 8, 16, 32, 6]
    tasks = sched.usage()["tasks"]
    sched.shutdown()
    assert tasks["trainer/train"] == 1 and "engine/train" not in tasks
    assert sum(v for k, v in tasks.items() if k.endswith("/rollout")) == 6
    with pytest.raises(ValueError, match="lacks custom resources"):
      RayScheduler([Resource("elsewhere", {"env"})])
    # A local resource (the trainer, whose state the driver holds) runs its tasks in this
    # process and needs no Ray resource; the others still run on Ray workers.
    mixed = RayScheduler([Resource("here", {"train"}), resources[1]], local=("here",))
    try:
      train = mixed.submit("train", os.getpid)
      rollouts = [mixed.submit("rollout", os.getpid) for _ in range(2)]
      assert train.result(timeout=120) == os.getpid()
      assert all(f.result(timeout=120) != os.getpid() for f in rollouts)
      assert mixed.usage()["tasks"] == {"here/train": 1, "engine/rollout": 2}
    finally:
      mixed.shutdown()
    with pytest.raises(ValueError, match="not among"):
      RayScheduler(resources, local=("nowhere",))
  finally:
    ray.shutdown()
