"""What travels through a batcher: one Job per image, its Outcome, and the ways a job can fail.

Nothing here knows about batching policy; `service.batcher` moves Jobs, `service.dispatch` reads Outcomes and
turns the errors into HTTP answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class Priority(IntEnum):
    """A request's urgency: batches fill from the highest level down, first come first served within a level."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


class QueueFullError(RuntimeError):
    """The queue holds `capacity` jobs (or this job was shed for a more urgent one); retry after `retry_after_s`."""

    def __init__(self, capacity: int, retry_after_s: int, *, shed: bool = False) -> None:
        reason = "a more urgent request took this one's place in" if shed else "no room is left in"
        super().__init__(
            f"the inference queue is full ({capacity} images waiting; {reason} it); retry in {retry_after_s} s"
        )
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
    priority: Priority = Priority.NORMAL
    submitted_at: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued (also while its batch fills) -> dispatched | left
    context: Any = None  # the submitter's trace context, kept here by the batcher's observer (service.batch_spans)


class BatchObserver:
    """Told of each job's submission (on the submitter's task) and of each batch once it has run; this one does
    nothing (service.batch_spans' traces the batches)."""

    def submitted(self, job: Job) -> None:
        """On the submitter's task, as the job is queued."""

    def finished(self, jobs: Sequence[Job], dispatched: float, error: BaseException | None) -> None:
        """On the event loop once the batch of `jobs`, dispatched at time.monotonic() `dispatched`, has run."""
