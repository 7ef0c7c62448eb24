"""The dynamic batcher without HTTP: batches, delays, capacity, cancellation, failures, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batcher import Batcher
from service.jobs import BatchFailedError, DeadlineExceeded, QueueFullError, ShuttingDownError
from service.metrics import Metrics


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """run_batch that doubles its inputs and remembers the batches it saw."""

    def __init__(self, fail_when=None, delay_s: float = 0.0):
        self.batches: list[list[int]] = []
        self.fail_when = fail_when
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def __call__(self, items):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when in items:
            raise RuntimeError("boom")
        return [2 * x for x in items]


def test_every_job_gets_exactly_its_own_answer_in_batches_of_at_most_max():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_delay_s=0.05, capacity=100)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=10) for i in range(10)]
        outcomes = await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return recorder, outcomes

    recorder, outcomes = run(scenario())
    assert [o.result for o in outcomes] == [2 * i for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]  # full batches flush at once, the rest at the delay
    assert sorted(x for b in recorder.batches for x in b) == list(range(10))
    assert len(recorder.threads) == 1 and next(iter(recorder.threads)).startswith("vitae-")


def time_a_lone_job(**options) -> tuple:
    """A started Batcher(**options) given one job: its Outcome and the seconds from submission to answer."""

    async def scenario():
        batcher = Batcher(Recorder(), **options)
        batcher.start()
        started = time.monotonic()
        # Without a flush the lone job would wait for company until this bound (or its deadline).
        outcome = await asyncio.wait_for(batcher.submit(1, timeout_s=60).future, timeout=30)
        waited = time.monotonic() - started
        await batcher.close()
        return outcome, waited

    return run(scenario())


def test_a_lone_job_on_an_idle_engine_goes_at_once():
    outcome, waited = time_a_lone_job(max_batch_size=8, max_delay_s=30, capacity=10)
    # With a 30 s delay, anything but "at once" would wait the delay: the bound only allows a loaded machine.
    assert waited < 10 and outcome.batch_size == 1


def test_a_lone_job_waits_the_max_delay_and_no_longer_when_told_to_wait_when_idle():
    outcome, waited = time_a_lone_job(max_batch_size=8, max_delay_s=0.2, capacity=10, wait_when_idle=True)
    # The lower bound is exact (the flush is anchored at submission); the upper one only says "not the
    # bound nor the deadline", wide enough for a loaded machine.
    assert 0.18 <= waited < 15
    assert outcome.batch_size == 1 and outcome.queue_s >= 0.18


def test_while_a_batch_is_computed_the_next_one_waits_for_company_up_to_the_delay():
    async def scenario():
        release = threading.Event()

        def run_batch(items):
            if items == [0]:
                release.wait(20)  # the first batch holds one worker until the test lets it go
            return [2 * x for x in items]

        batcher = Batcher(run_batch, max_batch_size=3, max_delay_s=30, capacity=10, workers=2)
        batcher.start()
        first = batcher.submit(0, timeout_s=60)
        await asyncio.sleep(0.05)  # the first batch is in flight, alone: the engine was idle
        later = [batcher.submit(1, timeout_s=60)]
        await asyncio.sleep(0.1)
        later += [batcher.submit(i, timeout_s=60) for i in (2, 3)]  # they complete the waiting batch
        outcomes = await asyncio.wait_for(asyncio.gather(*(job.future for job in later)), timeout=20)
        release.set()
        await first.future
        await batcher.close()
        return outcomes

    assert [o.batch_size for o in run(scenario())] == [3, 3, 3]


def test_jobs_arriving_during_the_delay_join_the_batch():
    async def scenario():
        recorder = Recorder()
        # A full batch of two flushes at once, so the long delay costs nothing and no scheduling hiccup
        # between the two submissions can flush the first job alone.
        batcher = Batcher(recorder, max_batch_size=2, max_delay_s=30, capacity=10, wait_when_idle=True)
        batcher.start()
        first = batcher.submit(1, timeout_s=60)
        await asyncio.sleep(0.05)
        second = batcher.submit(2, timeout_s=60)
        await asyncio.gather(first.future, second.future)
        await batcher.close()
        return recorder

    assert run(scenario()).batches == [[1, 2]]


def test_queue_full_is_refused_at_once_with_a_retry_hint():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=2, max_delay_s=0.2, capacity=2)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=10) for i in range(2)]
        with pytest.raises(QueueFullError) as refused:
            batcher.submit(3, timeout_s=10)
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return refused.value

    assert run(scenario()).retry_after_s >= 1


def test_cancelled_and_expired_jobs_are_never_computed():
    async def scenario():
        metrics = Metrics()
        recorder = Recorder()
        batcher = Batcher(
            recorder, max_batch_size=8, max_delay_s=0.2, capacity=10, metrics=metrics, wait_when_idle=True
        )
        batcher.start()
        cancelled = batcher.submit(1, timeout_s=10)
        expired = batcher.submit(2, timeout_s=0.05)
        kept = batcher.submit(3, timeout_s=10)
        cancelled.future.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert batcher.depth == 2  # the cancelled one left the queue at once
        result = await kept.future
        with pytest.raises(DeadlineExceeded):
            await expired.future
        await batcher.close()
        return recorder, result, metrics

    recorder, result, metrics = run(scenario())
    assert recorder.batches == [[3]] and result.result == 6
    assert metrics.dropped.labels("model", "cancelled")._value.get() == 1
    assert metrics.dropped.labels("model", "deadline")._value.get() == 1


def test_a_failing_batch_fails_only_its_own_jobs():
    async def scenario():
        batcher = Batcher(Recorder(fail_when=13), max_batch_size=2, max_delay_s=0.01, capacity=10)
        batcher.start()
        doomed = [batcher.submit(i, timeout_s=10) for i in (12, 13)]
        results = await asyncio.gather(*(j.future for j in doomed), return_exceptions=True)
        later = await batcher.submit(5, timeout_s=10).future
        await batcher.close()
        return results, later

    results, later = run(scenario())
    assert all(isinstance(r, BatchFailedError) and "boom" in str(r) for r in results)
    assert later.result == 10


def test_close_drains_everything_queued_and_then_refuses():
    async def scenario():
        recorder = Recorder(delay_s=0.05)
        batcher = Batcher(recorder, max_batch_size=2, max_delay_s=60, capacity=100)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=120) for i in range(5)]
        started = time.monotonic()
        await batcher.close()  # does not wait out the 60 s delay, but computes all five
        elapsed = time.monotonic() - started
        with pytest.raises(ShuttingDownError):
            batcher.submit(9, timeout_s=10)
        return [j.future.result().result for j in jobs], elapsed

    results, elapsed = run(scenario())
    assert results == [0, 2, 4, 6, 8]
    assert elapsed < 30  # far below the delay, however loaded the machine


# ------------------------------------------------------------------ several workers (inference streams)


def test_two_workers_compute_two_batches_at_once():
    # Each batch waits for the other at the barrier: with one worker the first would wait alone and fail.
    meeting = threading.Barrier(2, timeout=20)

    def run_batch(items):
        meeting.wait()
        return [(x, threading.current_thread().name) for x in items]

    async def scenario():
        batcher = Batcher(run_batch, max_batch_size=1, max_delay_s=0, capacity=10, workers=2)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=60) for i in range(2)]
        outcomes = await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return outcomes

    outcomes = run(scenario())
    assert [o.result[0] for o in outcomes] == [0, 1]
    assert len({o.result[1] for o in outcomes}) == 2  # two worker threads


def test_jobs_arriving_while_every_worker_is_busy_leave_together():
    async def scenario():
        recorder = Recorder(delay_s=0.4)
        batcher = Batcher(recorder, max_batch_size=16, max_delay_s=0, capacity=100, workers=2)
        batcher.start()
        first = []
        for i in (0, 1):  # one job each for both workers (no delay: a lone job leaves at once)
            first.append(batcher.submit(i, timeout_s=60))
            await asyncio.sleep(0.05)
        later = [batcher.submit(i, timeout_s=60) for i in range(2, 8)]
        await asyncio.gather(*(job.future for job in first + later))
        await batcher.close()
        return recorder

    recorder = run(scenario())
    assert sorted(map(sorted, recorder.batches)) == [[0], [1], [2, 3, 4, 5, 6, 7]]


def test_close_waits_for_every_batch_in_flight_on_every_worker():
    async def scenario():
        recorder = Recorder(delay_s=0.2)
        batcher = Batcher(recorder, max_batch_size=1, max_delay_s=0, capacity=100, workers=3)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=60) for i in range(7)]
        await batcher.close()
        return [job.future.done() and job.future.result().result for job in jobs], recorder

    results, recorder = run(scenario())
    assert results == [2 * i for i in range(7)]
    assert len(recorder.threads) == 3


def test_workers_must_be_at_least_one():
    with pytest.raises(ValueError, match="workers"):
        Batcher(Recorder(), max_batch_size=1, max_delay_s=0, capacity=1, workers=0)
