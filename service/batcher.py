"""Dynamic batching: one priority queue in, batches out to `workers` worker threads, one answer per job.

A batch is flushed when it holds `max_batch_size` jobs or when its first job has waited
`max_delay_s` — waiting only while another batch is being computed: when no batch is in flight the engine is
idle, and a batch leaves at once with the jobs already queued (a lone request never waits for company; under
load, batches fill while the engine is busy). `wait_when_idle` waits the delay in every case (more images per
batch at low load, for engines whose batch-1 cost is most of a full batch's, at a lone request's expense).
Batches fill highest priority first, first come first served within a level (`service.job_queue`), and a batch
led by a high-priority job takes only high-priority jobs (`URGENT`); a full queue sheds its least urgent job for a
more urgent one. Up to `workers` batches are computed at once (a backend with several inference streams, e.g.
OpenVINO's CPU streams); the next batch starts filling only when a worker is free, so jobs that arrive while every
worker is busy wait in the queue and leave together. For `urgent_window_s` after a high-priority job arrives, one
batch is computed at a time: an urgent batch then waits for one batch, not for one per stream, and runs alone (on
every core, with a backend that computes a lone batch so: `runs_alone_on_every_core`). Every submitted job's future
is resolved exactly once: with an Outcome, with the batch's failure, with DeadlineExceeded, with QueueFullError
when shed, or cancelled by its caller (then it is never computed).
Nothing here knows about HTTP, images or models: `run_batch` is any function list -> list.

The path of one image through a batcher:
  1. submit      the route queues a Job (payload, future, deadline, priority); refused at once when the
                 queue is full of jobs at least as urgent (QueueFullError; otherwise the newest of the
                 least urgent is shed with QueueFullError) or closing (ShuttingDownError)
  2. wait        once a worker is free, the loop takes the most urgent, oldest job and, while another batch
                 is in flight, waits up to `max_delay_s` from its submission for more, until `max_batch_size`
                 jobs (with none in flight it takes only those queued, unless `wait_when_idle`); cancelled or
                 expired jobs leave uncomputed
  3. dispatch    the live jobs of the batch go to `run_batch` on a worker thread, in one call
  4. resolve     each future gets its Outcome (result, queue and inference times, batch size), or the
                 batch's BatchFailedError
  5. close       on shutdown every job still queued is run (steps 2-4 without the delay), then the loop
                 ends once every batch in flight has answered
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from .job_queue import JobQueue
from .jobs import (
    BatchFailedError,
    BatchObserver,
    DeadlineExceeded,
    Job,
    Outcome,
    Priority,
    QueueFullError,
    ShuttingDownError,
)
from .metrics import Metrics
from .threads import name_this_thread

log = logging.getLogger(__name__)

# A batch led by a job of this level takes no less urgent job: on CPU a batch costs about the sum of its images, so
# topping an urgent image up with normal ones would multiply its inference time (ViTAE-T, OpenVINO, 16 normal clients:
# a high-priority request's p50 232 -> 90 ms, the normal clients' throughput 54 -> 51 images/s).
URGENT = Priority.HIGH

P = TypeVar("P")
R = TypeVar("R")


class Batcher(Generic[P, R]):
    """Collects jobs into batches for `run_batch`, which runs on this batcher's own worker threads.

    With `workers` > 1, `run_batch` is called from that many threads at once and must allow it.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[P]], Sequence[R]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        capacity: int,
        name: str = "model",
        metrics: Metrics | None = None,
        workers: int = 1,
        observer: BatchObserver | None = None,
        wait_when_idle: bool = False,
        urgent_window_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1 or capacity < 1 or workers < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size, capacity and workers must be >= 1 and max_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self.name = name
        self.metrics = metrics
        self.workers = workers
        self.wait_when_idle = wait_when_idle
        self.urgent_window_s = urgent_window_s
        self._urgent_at = float("-inf")  # when the last high-priority job was submitted (time.monotonic)
        self.observer = observer or BatchObserver()  # tracing's, or one that does nothing
        self.executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix=f"vitae-{name}",
            initializer=name_this_thread,
            initargs=(f"vitae-{name}",),
        )
        self._free = asyncio.Semaphore(workers)  # workers not computing a batch
        self._in_flight: set[asyncio.Task] = set()
        self._queue = JobQueue()
        self._pending = 0  # submitted jobs not yet dispatched nor left
        self._closing = False
        self._task: asyncio.Task | None = None
        self._batch_time_s = max(max_delay_s, 0.01)  # running estimate per worker, for Retry-After

    @property
    def depth(self) -> int:
        """Jobs not yet handed to the backend, including those in a filling batch (what the capacity bounds)."""
        return self._pending

    @property
    def accepting(self) -> bool:
        return self._task is not None and not self._closing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def run_on_worker(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run a call on a worker thread (warm-up, one-off work) beside the batches."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def submit(self, payload: P, *, timeout_s: float, priority: Priority = Priority.NORMAL) -> Job[P]:
        """Queue one job; await `job.future`. Raises QueueFullError or ShuttingDownError at once.

        When the queue is full, a job sheds the newest queued job of the lowest level below its own (that
        job's future gets QueueFullError); with none below it, it is refused itself.
        """
        if not self.accepting:
            raise ShuttingDownError("the service is shutting down and takes no new requests")
        if self._pending >= self.capacity:
            victim = self._queue.victim_for(priority)
            if victim is None:
                raise QueueFullError(self.capacity, self._retry_after_s())
            self._leave(victim, "shed")
            victim.future.set_exception(QueueFullError(self.capacity, self._retry_after_s(), shed=True))
        loop = asyncio.get_running_loop()
        job = Job(payload, loop.create_future(), deadline=time.monotonic() + timeout_s, priority=priority)
        job.future.add_done_callback(lambda _: self._leave(job, "cancelled"))
        self.observer.submitted(job)
        self._pending += 1
        self._set_depth()
        if priority >= URGENT:
            self._urgent_at = time.monotonic()
        self._queue.push(job)
        return job

    async def close(self) -> None:
        """Stop taking jobs, run every job already queued, then stop the loop and the worker thread."""
        self._closing = True
        self._queue.wake()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
        self.executor.shutdown(wait=True)

    def _retry_after_s(self) -> int:
        batches_ahead = (self._pending / self.max_batch_size + 1) / self.workers
        return max(1, round(batches_ahead * self._batch_time_s + 0.5))

    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(self._pending)

    def _leave(self, job: Job, reason: str) -> None:
        """A queued job leaves without being computed (its caller gave up, or its deadline passed)."""
        if job.state != "queued":
            return
        job.state = "left"
        self._pending -= 1
        self._set_depth()
        if self.metrics:
            self.metrics.dropped.labels(self.name, reason).inc()

    def _alive(self, job: Job) -> bool:
        """Whether a job still wants computing; drops (once) the cancelled and the expired."""
        if job.state != "queued":
            return False
        if job.future.done():
            self._leave(job, "cancelled")
            return False
        if time.monotonic() >= job.deadline:
            job.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
            self._leave(job, "deadline")
            return False
        return True

    async def _next_job(self, until: float | None, at_least: Priority = Priority.LOW) -> Job | None:
        """The next live job of `at_least` or above, waiting until loop time `until` (None: no limit); None when
        none came or closing."""
        loop = asyncio.get_running_loop()
        while True:
            job = self._queue.pop(at_least)
            if job is not None:
                if self._alive(job):
                    return job
                continue
            remaining = None if until is None else until - loop.time()
            if self._closing or (remaining is not None and remaining <= 0) or not await self._queue.wait(remaining):
                return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._free.acquire()  # the batch fills only once a worker can take it
                if time.monotonic() - self._urgent_at < self.urgent_window_s:
                    await self._none_in_flight()  # urgent traffic: one batch at a time
                first = await self._next_job(None)
                if first is None:  # closing, and every queued job has been taken
                    self._free.release()
                    break
                batch = [first]
                # The flush time is anchored at the first job's submission, not at when we got to it. With no
                # batch in flight the engine is idle: waiting for company would only delay a lone request, so
                # the batch takes what is queued now and goes.
                delay = self.max_delay_s if self._in_flight or self.wait_when_idle else 0.0
                flush_at = loop.time() + max(0.0, delay - (time.monotonic() - first.submitted_at))
                while len(batch) < self.max_batch_size:
                    job = await self._next_job(flush_at, URGENT if first.priority >= URGENT else Priority.LOW)
                    if job is None:
                        break
                    batch.append(job)
                task = loop.create_task(self._execute(batch), name=f"batch-{self.name}")
                self._in_flight.add(task)
                task.add_done_callback(self._finished)
        finally:
            if self._in_flight:  # close() returns once every batch in flight has answered
                await asyncio.wait(set(self._in_flight))

    async def _none_in_flight(self) -> None:
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    def _finished(self, task: asyncio.Task) -> None:
        self._in_flight.discard(task)
        self._free.release()

    async def _execute(self, batch: list[Job]) -> None:
        live = [job for job in batch if self._alive(job)]  # a caller may have left while the batch filled
        if not live:
            return
        for job in live:
            job.state = "dispatched"
        self._pending -= len(live)
        self._set_depth()
        dispatched = time.monotonic()
        if self.metrics:
            for job in live:
                self.metrics.queue_wait.labels(self.name).observe(dispatched - job.submitted_at)
            self.metrics.batch_size.labels(self.name).observe(len(live))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, [job.payload for job in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} inputs")
        except Exception as exc:
            log.exception("batch of %d failed in %s", len(live), self.name)
            if self.metrics:
                self.metrics.batch_failures.labels(self.name).inc()
            self.observer.finished(live, dispatched, exc)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(BatchFailedError(f"inference failed for this batch: {exc}"))
            return
        elapsed = time.monotonic() - dispatched
        self._batch_time_s = 0.8 * self._batch_time_s + 0.2 * elapsed
        if self.metrics:
            self.metrics.inference.labels(self.name).observe(elapsed)
        self.observer.finished(live, dispatched, None)
        for job, result in zip(live, results, strict=True):
            if not job.future.done():
                job.future.set_result(Outcome(result, dispatched - job.submitted_at, elapsed, len(live)))
