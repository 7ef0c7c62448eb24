"""Prepared images through the batchers under the request's one deadline: submit every job, await every answer.

Shared by /classify (`service.classify_flow`) and the KServe v2 infer route (`service.v2.flow`), so both kinds
of traffic share batches, limits, deadlines and metrics.
1. within_deadline   504 when reading, parsing, decoding, inference and encoding pass the request's deadline
                     (X-Request-Timeout or v2's `timeout`, capped by VITAE_REQUEST_TIMEOUT_S)
2. submit_all        queue every job or none at the request's priority (503 with Retry-After when full or
                     shutting down)
3. await_jobs        every outcome; 504 at the deadline, 499 on disconnect, 503 when shed for a more urgent
                     request, cancelling what has not run
4. infer             the classify batcher, then the Grad-CAM batcher when a CAM of an earlier cell is asked for
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request

from . import logs
from .batcher import Batcher
from .inference import ClassifyInput, ClassifyOutput, GradCAMInput, PreparedImage
from .jobs import BatchFailedError, DeadlineExceeded, Job, Outcome, Priority, QueueFullError, ShuttingDownError
from .lifecycle import Runtime
from .request_policy import RequestPolicy

DEADLINE_SOURCE = "X-Request-Timeout or VITAE_REQUEST_TIMEOUT_S"


@dataclass(frozen=True)
class Options:
    k: int  # /classify's top-k (unused by v2)
    cam: bool
    target: int | None  # class index for the CAM; None: the top-1
    layer: int | None  # cell index for an autograd CAM; None: from the backend's outputs
    tokens: bool = False  # v2's `tokens` output: the backend returns these images' last-cell tokens


# ---------------------------------------------------------------- 1. one deadline for all the work


@asynccontextmanager
async def within_deadline(deadline: float) -> AsyncIterator[None]:
    """504 when a request's work passes its deadline (time.monotonic()).

    The work: reading multipart uploads, parsing a v2 body, decoding, inference, CAM drawing, encoding the answer.
    What has not started is cancelled (queued decodes and batcher jobs); a decode already running in the
    pool finishes there, bounded by VITAE_MAX_IMAGE_PIXELS and VITAE_CAM_MAX_SIDE.
    """
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            yield
    except TimeoutError:
        raise HTTPException(
            504, detail=f"the request's deadline passed before its images were answered ({DEADLINE_SOURCE})"
        ) from None


# ---------------------------------------------------------------- 2-4. inference through the batchers


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_jobs(request: Request, jobs: list[Job], deadline: float) -> list[Outcome]:
    """Every job's outcome; 504 at the deadline and 499 on disconnect, cancelling what has not run."""
    everything = asyncio.gather(*(job.future for job in jobs))
    # Mark its outcome retrieved: after a timeout or a disconnect nobody reads the cancelled gather.
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {everything, disconnect}, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
        if everything in done:
            return everything.result()
        reason = (499, "the client disconnected") if disconnect in done else (504, "the request's deadline passed")
        raise HTTPException(reason[0], detail=f"{reason[1]} before inference finished ({DEADLINE_SOURCE})")
    except DeadlineExceeded as exc:
        raise HTTPException(504, detail=f"{exc} ({DEADLINE_SOURCE})") from exc
    except QueueFullError as exc:  # shed for a more urgent request
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except BatchFailedError as exc:
        raise HTTPException(500, detail=str(exc)) from exc
    finally:
        disconnect.cancel()
        for job in jobs:
            job.future.cancel()  # no-op for the finished; the queued ones leave the queue uncomputed


def submit_all(batcher: Batcher, payloads: list, timeout_s: float, priority: Priority = Priority.NORMAL) -> list[Job]:
    """Queue every payload or none: 503 with Retry-After when the queue is full or shutting down."""
    jobs: list[Job] = []
    try:
        for payload in payloads:
            jobs.append(batcher.submit(payload, timeout_s=timeout_s, priority=priority))
    except QueueFullError as exc:
        for job in jobs:
            job.future.cancel()
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except ShuttingDownError as exc:
        for job in jobs:
            job.future.cancel()
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "5"}) from exc
    return jobs


def refuse_failed(outcomes: list[Outcome[ClassifyOutput]]) -> None:
    """500 naming the cause when an image has no answer (its outputs were not finite, see service.numerics)."""
    failed = [(i, o.result.failure) for i, o in enumerate(outcomes) if o.result.failure]
    if failed:
        which = ", ".join(str(i) for i, _ in failed)
        raise HTTPException(500, detail=f"no answer for image {which} of {len(outcomes)}: {failed[0][1]}")


def note_outcomes(runtime: Runtime, outcomes: list[Outcome]) -> None:
    """The request's model and its longest queue wait and batch, for its log line (service.logs)."""
    logs.note(
        model=f"{runtime.served.name}:{runtime.served.version}",
        queue_ms=round(max(o.queue_s for o in outcomes) * 1000, 3) if outcomes else None,
        inference_ms=round(max(o.inference_s for o in outcomes) * 1000, 3) if outcomes else None,
    )


@dataclass(frozen=True)
class Answer:
    outcome: Outcome[ClassifyOutput]
    cam_raw: np.ndarray | None  # (h, w) before ReLU, when a CAM was asked for
    cam_class: int | None
    cam_s: float  # autograd Grad-CAM time, 0 for the backend-output CAM


async def infer(
    request: Request, runtime: Runtime, images: list[PreparedImage], opts: Options, policy: RequestPolicy
) -> list[Answer]:
    """Classify through the batcher; CAMs from the backend's outputs, or by autograd at an earlier cell."""
    deadline, priority = policy.deadline, policy.priority
    cam, layer, target = opts.cam, opts.layer, opts.target
    jobs = submit_all(
        runtime.classifier,
        [ClassifyInput(image.pixels, cam and layer is None, target, opts.tokens) for image in images],
        max(0.001, deadline - time.monotonic()),
        priority,
    )
    outcomes = await await_jobs(request, jobs, deadline)
    note_outcomes(runtime, outcomes)
    refuse_failed(outcomes)
    if not (cam and layer is not None):
        return [Answer(o, o.result.cam_raw, o.result.cam_class, 0.0) for o in outcomes]
    # The CAM explains the backend's own top-1 unless a class was asked for.
    targets = [target if target is not None else int(np.argmax(o.result.logits)) for o in outcomes]
    cam_jobs = submit_all(
        runtime.explainer,
        [GradCAMInput(image.pixels, t, layer) for image, t in zip(images, targets, strict=True)],
        max(0.001, deadline - time.monotonic()),
        priority,
    )
    cams = await await_jobs(request, cam_jobs, deadline)
    return [Answer(o, c.result, t, c.inference_s) for o, c, t in zip(outcomes, cams, targets, strict=True)]
