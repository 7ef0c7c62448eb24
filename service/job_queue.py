"""The batcher's queue policy: one first-come-first-served line per priority level, taken highest level first.

When the batcher is full, a more urgent job takes the place of the newest job of the lowest level below its own
(that one is shed: answered 503), so the least urgent work is refused first and nothing within a level is
overtaken. Jobs that left the line (cancelled by their caller, expired, shed) stay in their deque until they
reach one of its ends and are dropped there, so leaving costs nothing here.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .jobs import Job, Priority

HIGHEST_FIRST = sorted(Priority, reverse=True)


class JobQueue:
    """Queued jobs by priority level; `pop` is FCFS within the highest level that holds a queued job."""

    def __init__(self) -> None:
        self._lines: dict[Priority, deque[Job]] = {level: deque() for level in Priority}
        self._arrived = asyncio.Event()  # set by push and wake

    def push(self, job: Job) -> None:
        self._lines[job.priority].append(job)
        self._arrived.set()

    def wake(self) -> None:
        """End every `wait` now (the batcher is closing)."""
        self._arrived.set()

    async def wait(self, timeout_s: float | None) -> bool:
        """Wait for the next push or wake, at most `timeout_s` (None: no limit); False when the time ran out."""
        self._arrived.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._arrived.wait()
        except TimeoutError:
            return False
        return True

    def pop(self, at_least: Priority = Priority.LOW) -> Job | None:
        """The oldest queued job of the highest level, of `at_least` or above; None when no such job is queued."""
        for level in HIGHEST_FIRST:
            if level < at_least:
                return None
            line = self._lines[level]
            while line:
                job = line.popleft()
                if job.state == "queued":
                    return job
        return None

    def victim_for(self, priority: Priority) -> Job | None:
        """The job to shed so that one of `priority` fits: the newest of the lowest level below it, or None."""
        for level in sorted(Priority):
            if level >= priority:
                return None
            line = self._lines[level]
            while line:
                if line[-1].state == "queued":
                    return line.pop()
                line.pop()
        return None
