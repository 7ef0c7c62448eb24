"""The batcher's queue policy without HTTP: most urgent first, FCFS within a level, the least urgent shed first."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.batcher import Batcher
from service.jobs import Priority, QueueFullError
from service.metrics import Metrics

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


class HeldRecorder:
    """run_batch that remembers its batches and holds the first one until `gate` opens (the worker is 'busy')."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return list(items)


async def busy_batcher(
    recorder: HeldRecorder, capacity: int = 100, metrics: Metrics | None = None, max_batch_size: int = 1
) -> Batcher:
    """A started batcher (of batch size 1 by default) whose one worker is held computing job 'busy'."""
    batcher = Batcher(recorder, max_batch_size=max_batch_size, max_delay_s=0, capacity=capacity, metrics=metrics)
    batcher.start()
    batcher.submit("busy", timeout_s=60)
    assert await asyncio.to_thread(recorder.started.wait, 30), "the first batch never started"
    return batcher


def test_batches_fill_most_urgent_first_and_first_come_first_served_within_a_level():
    async def scenario():
        recorder = HeldRecorder()
        batcher = await busy_batcher(recorder)
        order = [("low1", LOW), ("normal1", NORMAL), ("high1", HIGH), ("normal2", NORMAL), ("high2", HIGH)]
        jobs = [batcher.submit(name, timeout_s=60, priority=level) for name, level in order]
        jobs.append(batcher.submit("low2", timeout_s=60, priority=LOW))
        recorder.gate.set()
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return recorder.batches

    batches = asyncio.run(scenario())
    assert [b[0] for b in batches] == ["busy", "high1", "high2", "normal1", "normal2", "low1", "low2"]


def test_a_high_priority_batch_holds_only_high_priority_jobs_and_others_mix():
    async def scenario():
        recorder = HeldRecorder()
        batcher = await busy_batcher(recorder, max_batch_size=4)
        order = [("normal1", NORMAL), ("high1", HIGH), ("low1", LOW), ("normal2", NORMAL), ("high2", HIGH)]
        jobs = [batcher.submit(name, timeout_s=60, priority=level) for name, level in order]
        recorder.gate.set()
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return recorder.batches

    assert asyncio.run(scenario()) == [["busy"], ["high1", "high2"], ["normal1", "normal2", "low1"]]


def test_a_full_queue_sheds_the_newest_least_urgent_job_and_refuses_when_none_is_less_urgent():
    async def scenario():
        recorder = HeldRecorder()
        metrics = Metrics()
        batcher = await busy_batcher(recorder, capacity=3, metrics=metrics)
        low_a = batcher.submit("low_a", timeout_s=60, priority=LOW)
        low_b = batcher.submit("low_b", timeout_s=60, priority=LOW)
        normal_a = batcher.submit("normal_a", timeout_s=60, priority=NORMAL)
        high = batcher.submit("high", timeout_s=60, priority=HIGH)  # sheds low_b, the newest low
        normal_b = batcher.submit("normal_b", timeout_s=60, priority=NORMAL)  # sheds low_a
        refused = []
        for name, level in (("low_c", LOW), ("normal_c", NORMAL)):  # nothing less urgent is left to shed
            with pytest.raises(QueueFullError) as caught:
                batcher.submit(name, timeout_s=60, priority=level)
            refused.append(caught.value.retry_after_s)
        depth = batcher.depth
        recorder.gate.set()
        done = await asyncio.gather(
            *(j.future for j in (low_a, low_b, normal_a, high, normal_b)), return_exceptions=True
        )
        await batcher.close()
        shed = metrics.dropped.labels("model", "shed")._value.get()
        return done, refused, depth, recorder.batches, shed

    (low_a, low_b, normal_a, high, normal_b), refused, depth, batches, shed = asyncio.run(scenario())
    assert isinstance(low_a, QueueFullError) and isinstance(low_b, QueueFullError)
    assert "more urgent" in str(low_b) and low_b.retry_after_s >= 1
    assert [o.result for o in (normal_a, high, normal_b)] == ["normal_a", "high", "normal_b"]
    assert all(seconds >= 1 for seconds in refused) and depth == 3
    assert [b[0] for b in batches] == ["busy", "high", "normal_a", "normal_b"]  # the shed were never computed
    assert shed == 2


class Overlaps:
    """run_batch on two workers that records its batches and the most batches it ever computed at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.batches: list[list[str]] = []

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.batches.append(list(items))
        threading.Event().wait(0.05)  # long enough for a second worker to start beside it
        with self.lock:
            self.running -= 1
        return list(items)


@pytest.mark.parametrize("window_s", [0.0, 60.0])
def test_after_a_high_priority_job_batches_are_computed_one_at_a_time_for_the_urgent_window(window_s):
    """Two workers, batches of one: normal jobs alone run two at a time. Within the window after a high job, no
    batch runs beside another, so the urgent image waits for one batch at most; with the window off they overlap."""

    async def scenario() -> tuple[int, int, list[list[str]]]:
        record = Overlaps()
        batcher = Batcher(record, max_batch_size=1, max_delay_s=0, capacity=100, workers=2, urgent_window_s=window_s)
        batcher.start()
        await asyncio.gather(*(batcher.submit(f"n{i}", timeout_s=60).future for i in range(6)))
        before = record.most
        record.most = 0
        jobs = [batcher.submit(f"m{i}", timeout_s=60) for i in range(6)]
        jobs.append(batcher.submit("high", timeout_s=60, priority=HIGH))
        await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return before, record.most, record.batches

    before, after, batches = asyncio.run(scenario())
    assert before == 2, "two workers should compute two normal batches at once"
    assert after == (1 if window_s else 2), batches
    queued_ahead = [b[0] for b in batches[6:]].index("high")
    assert queued_ahead <= 2, batches  # the high job overtook the queued normal ones


def test_only_a_backend_that_computes_a_lone_batch_on_every_core_gets_the_urgent_window():
    """Serialising batches pays only where a lone batch then takes every core (OpenVINO with several streams);
    elsewhere it would idle cores, so the classify batcher gets VITAE_URGENT_WINDOW_S only there."""
    from types import SimpleNamespace

    from service.runtime import _batcher
    from service.settings import Settings

    settings = Settings(urgent_window_s=3)
    cases = [
        (SimpleNamespace(runs_alone_on_every_core=True), 2, 3.0),
        (SimpleNamespace(runs_alone_on_every_core=True), 1, 0.0),
        (SimpleNamespace(runs_alone_on_every_core=False), 2, 0.0),
        (SimpleNamespace(), 4, 0.0),  # a backend that does not say
    ]
    for backend, workers, window_s in cases:
        batcher = _batcher(list, settings, Metrics(), "classify", 1, workers, backend)
        assert batcher.urgent_window_s == window_s, (backend, workers)
        batcher.executor.shutdown()
