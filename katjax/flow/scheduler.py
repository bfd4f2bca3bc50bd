"""Tag-driven scheduler (SeamlessFlow, DESIGN.md section 6): resources carry tags, tasks need one.

A `Resource` is a unit of hardware (a trainer's devices, a rollout engine, an environment
host) with capability tags ("train", "rollout", "env", "reference") and a number of slots
(tasks it runs at once). `submit(tag, fn, ...)` queues a task that needs `tag`; the
dispatcher starts the oldest queued task that some free resource can serve. A resource with
several tags is time-multiplexed: the trainer's devices tagged {"train", "rollout"} serve
rollouts while no train step is queued, so colocated and disaggregated layouts are the same
program with different tag tables. Train tasks go first when both wait (the trainer is the
scarce consumer; a rollout waits one task at most).

Two backends share this dispatcher and differ only in how a started task runs:
`ThreadScheduler` runs it on a thread of this process; `RayScheduler` runs it as a Ray task
that holds one unit of the resource's own Ray custom resource (`katjax_<name>`, capacity =
slots), so Ray's accounting agrees with the dispatcher's on every node. The trainer itself
stays one JAX program (multi-controller across hosts), submitted as a "train" task; with
Ray its resource is `local` (this process owns the trainer's devices and state), so its
tasks run on a thread here while rollouts run on whichever nodes host the rollout resources.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import dataclasses
import threading
import time


@dataclasses.dataclass(frozen=True)
class Resource:
  name: str
  tags: frozenset
  slots: int = 1

  def __post_init__(self):
    object.__setattr__(self, "tags", frozenset(self.tags))
    if not self.tags:
      raise ValueError(f"resource {self.name!r} has no tags")
    if self.slots < 1:
      raise ValueError(f"resource {self.name!r}: slots must be >= 1, got {self.slots}")


_PRIORITY = {"train": 0}  # lower runs first; every other tag is 1


class _Dispatcher(abc.ABC):
  """Queue + slot accounting shared by the backends; `_launch` is the backend's part."""

  def __init__(self, resources):
    resources = list(resources)
    names = [r.name for r in resources]
    if not resources or len(set(names)) != len(names):
      raise ValueError(f"need at least one resource and unique names, got {names}")
    self.resources = {r.name: r for r in resources}
    self._free = {r.name: r.slots for r in resources}
    self._queue: collections.deque = collections.deque()
    self._lock = threading.Lock()
    self._closed = False
    # Per resource and tag: busy seconds and tasks run (what `usage` reports).
    self._busy = collections.defaultdict(float)
    self._count = collections.defaultdict(int)
    self._started = time.monotonic()

  @property
  def tags(self) -> frozenset:
    return frozenset().union(*(r.tags for r in self.resources.values()))

  def submit(self, tag: str, fn, *args, **kwargs) -> concurrent.futures.Future:
    """Queue fn(*args, **kwargs) on a resource tagged `tag`; a Future of its result."""
    if tag not in self.tags:
      raise ValueError(f"no resource has tag {tag!r} (tags: {sorted(self.tags)})")
    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._lock:
      if self._closed:
        raise RuntimeError("scheduler is shut down")
      self._queue.append((tag, fn, args, kwargs, future))
    self._dispatch()
    return future

  def usage(self) -> dict:
    """{resource: {tag: busy fraction of the wall time since start}} and task counts."""
    wall = max(time.monotonic() - self._started, 1e-9)
    with self._lock:
      return {"busy": {r: {t: self._busy[r, t] / wall for t in res.tags}
                       for r, res in self.resources.items()},
              "tasks": {f"{r}/{t}": n for (r, t), n in self._count.items()}}

  def shutdown(self) -> None:
    with self._lock:
      self._closed = True
      pending, self._queue = list(self._queue), collections.deque()
    for *_, future in pending:
      future.cancel()

  def _dispatch(self) -> None:
    while True:
      with self._lock:
        picked = self._pick()
        if picked is None:
          return
        index, name = picked
        tag, fn, args, kwargs, future = self._queue[index]
        del self._queue[index]
        self._free[name] -= 1
      if future.set_running_or_notify_cancel():
        self._launch(name, tag, fn, args, kwargs, future)
      else:
        self._release(name, tag, 0.0)

  def _pick(self):
    """(queue index, resource) of the task to start now, or None. Highest priority first,
    then oldest; a task takes the free resource with the fewest tags (keeps the versatile
    ones free for tasks only they can serve)."""
    order = sorted(range(len(self._queue)),
                   key=lambda i: (_PRIORITY.get(self._queue[i][0], 1), i))
    for i in order:
      tag = self._queue[i][0]
      free = [r for r in self.resources.values() if tag in r.tags and self._free[r.name] > 0]
      if free:
        return i, min(free, key=lambda r: (len(r.tags), r.name)).name
    return None

  def _release(self, name: str, tag: str, seconds: float) -> None:
    with self._lock:
      self._free[name] += 1
      self._busy[name, tag] += seconds
      self._count[name, tag] += 1
    self._dispatch()

  @abc.abstractmethod
  def _launch(self, name, tag, fn, args, kwargs, future) -> None:
    """Run fn on resource `name`; complete `future`; call `_release` when it ends."""


class ThreadScheduler(_Dispatcher):
  """In-process backend: each started task runs on a thread (one per slot at most)."""

  def __init__(self, resources):
    super().__init__(resources)
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=sum(r.slots for r in self.resources.values()),
        thread_name_prefix="katjax-flow")

  def _launch(self, name, tag, fn, args, kwargs, future):
    def run():
      start = time.monotonic()
      try:
        future.set_result(fn(*args, **kwargs))
      except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
        future.set_exception(e)
      finally:
        self._release(name, tag, time.monotonic() - start)
    self._pool.submit(run)

  def shutdown(self) -> None:
    super().shutdown()
    self._pool.shutdown(wait=True)


class RayScheduler(_Dispatcher):
  """Ray backend: a started task is a Ray task holding one unit of `katjax_<resource>`.

  `ray.init` must have declared those custom resources (`ray_resources(resources)` gives
  the dict for `ray.init(resources=...)` or `ray start --resources`); on a cluster each node
  declares the resources it hosts. Results come back through one waiter thread.

  local: names of resources hosted by this process (the trainer, whose state and devices the
  driver holds): their tasks run on a thread here, under the same tags and slots, and need
  no Ray resource. Functions sent to Ray must be picklable (module-level, or cloudpickled
  closures over picklable values).
  """

  def __init__(self, resources, *, local=()):
    import ray

    super().__init__(resources)
    unknown = sorted(set(local) - set(self.resources))
    if unknown:
      raise ValueError(f"local resources {unknown} are not among {sorted(self.resources)}")
    self._ray, self._local = ray, frozenset(local)
    have = ray.cluster_resources()
    remote = [r for r in self.resources.values() if r.name not in self._local]
    missing = [k for k, v in ray_resources(remote).items() if have.get(k, 0) < v]
    if missing:
      raise ValueError(f"the Ray cluster lacks custom resources {missing}; start it with "
                       f"resources=katjax.flow.scheduler.ray_resources(...)")
    self._threads = ThreadScheduler([self.resources[n] for n in sorted(self._local)]
                                    ) if self._local else None
    self._inflight: dict = {}
    self._cv = threading.Condition()
    self._waiter = threading.Thread(target=self._wait_loop, daemon=True)
    self._stop = False
    self._waiter.start()

  def _launch(self, name, tag, fn, args, kwargs, future):
    if name in self._local:
      # The thread backend runs it (its own slot count equals ours, so it never queues).
      inner = self._threads.submit(tag, _timed, fn, *args, **kwargs)
      inner.add_done_callback(lambda f: self._finish_local(f, name, tag, future))
      return
    remote = self._ray.remote(_timed).options(resources={f"katjax_{name}": 1}, num_cpus=0)
    ref = remote.remote(fn, *args, **kwargs)
    with self._cv:
      self._inflight[ref] = (name, tag, future)
      self._cv.notify()

  def _wait_loop(self):
    ray = self._ray
    while True:
      with self._cv:
        while not self._inflight and not self._stop:
          self._cv.wait()
        if self._stop and not self._inflight:
          return
        refs = list(self._inflight)
      done, _ = ray.wait(refs, num_returns=1, timeout=0.1)
      for ref in done:
        with self._cv:
          name, tag, future = self._inflight.pop(ref)
        seconds = 0.0
        try:
          result, seconds = ray.get(ref)
          future.set_result(result)
        except BaseException as e:  # noqa: BLE001
          future.set_exception(e)
        self._release(name, tag, seconds)

  def _finish_local(self, inner, name, tag, future):
    seconds = 0.0
    try:
      result, seconds = inner.result()
      future.set_result(result)
    except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
      future.set_exception(e)
    self._release(name, tag, seconds)

  def shutdown(self) -> None:
    super().shutdown()
    with self._cv:
      self._stop = True
      self._cv.notify()
    self._waiter.join()
    if self._threads is not None:
      self._threads.shutdown()


def ray_resources(resources) -> dict:
  """{"katjax_<name>": slots}: the Ray custom resources that back the given resources."""
  return {f"katjax_{r.name}": float(r.slots) for r in resources}


def _timed(fn, *args, **kwargs):
  start = time.monotonic()
  result = fn(*args, **kwargs)
  return result, time.monotonic() - start
