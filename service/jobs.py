"""What travels through a batcher: one Job per image, its Outcome, and the ways a job can fail.

Nothing here knows about batching policy; `service.batcher` moves Jobs, `service.dispatch` reads Outcomes and
turns the errors into HTTP answers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The queue holds `capacity` jobs; the caller should retry after `retry_after_s`."""

    def __init__(self, capacity: int, retry_after_s: int) -> None:
        super().__init__(f"the inference queue is full ({capacity} images waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(RuntimeError):
    """The batcher is draining for shutdown and takes no new jobs."""


class DeadlineExceeded(TimeoutError):
    """The job's deadline passed before its batch ran; it was not computed."""


class BatchFailedError(RuntimeError):
    """The backend raised while running this job's batch; other batches are unaffected."""


@dataclass(frozen=True)
class Outcome(Generic[R]):
    result: R
    queue_s: float  # submit -> batch dispatched
    inference_s: float  # the batch's run_batch call
    batch_size: int


@dataclass(eq=False)
class Job(Generic[P]):
    payload: P
    future: asyncio.Future
    deadline: float  # time.monotonic() seconds
    submitted_at: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued (also while its batch fills) -> dispatched | left
