"""Step 3 of a request (/classify and v2's `image_bytes`): uploads -> model inputs, each bad image its own error.

1. shares        uploads wait their turn here (`DecodeShares`), most urgent request first (`X-Priority`), first come
                 first served within a level, and enter the decode pool only while it has a free place (its
                 threads plus as many queued); `high` requests have a lane of their own at normal scheduling
                 priority. Each request in flight also keeps within its fair share: the pool's threads divided by
                 the requests decoding, at least one; so 64 huge PNGs of one client take the threads only while
                 nobody else waits, and a second request's image starts as soon as one of them frees
2. on the GPU    with PyTorch serving on CUDA (`Runtime.decoder`), the JPEGs of a request are decoded and
                 preprocessed on the device in one call (service.gpu_decode): device tensors the batch stacks
                 there; what it does not take (PNG, CMYK, a JPEG nvJPEG refuses) and CAM requests (the overlay
                 needs the picture) go to step 3
3. PIL           model.preprocess in the pool, one task per image (`service.inference.prepare_image`)
4. errors        a failed image becomes its HTTPException (400 undecodable, 413 too large, 500 unexpected)
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fastapi import HTTPException

from model.preprocess import ACCEPTED_FORMATS, ImageDecodeError, ImageTooLargeError, stored_size

from .artifacts import ServedArtifacts
from .inference import PreparedImage, prepare_image
from .jobs import Priority
from .tracing import step

log = logging.getLogger("service")

Run = Callable[..., Awaitable[Any]]  # run(fn, *args): fn(*args) in the decode pool, within the request's share


@dataclass(eq=False)
class Lane:
    """One executor's turn-taking: who is in it, and who waits (a heap: most urgent, then first come)."""

    pool: Executor
    workers: int
    slots: int  # decodes in the pool at once, running or in its own queue
    running: dict[object, int] = field(default_factory=dict)  # request -> its decodes in the pool
    in_pool: int = 0
    waiting: list[tuple[int, int, object, asyncio.Future[None]]] = field(default_factory=list)

    def share(self) -> int:
        return max(1, self.workers // max(1, len(self.running)))

    def admit(self) -> None:
        """Let the most urgent waiters within their request's share into the pool while it has places."""
        over_share = []
        while self.waiting and self.in_pool < self.slots:
            entry = heapq.heappop(self.waiting)
            _, _, key, ticket = entry
            if ticket.done() or key not in self.running:  # cancelled while waiting
                continue
            if self.running[key] >= self.share():
                over_share.append(entry)
                continue
            self.running[key] += 1
            self.in_pool += 1
            ticket.set_result(None)
        for entry in over_share:
            heapq.heappush(self.waiting, entry)

    def leave(self, key: object) -> None:
        self.in_pool -= 1
        if key in self.running:
            self.running[key] -= 1
        self.admit()


class DecodeShares:
    """The decode pool shared by urgency, then fairly; `high` requests decode in their own lane when one is given.

    At most `slots` decodes are in a pool at once (running or in its queue; by default two per thread, so a thread
    never idles waiting for the event loop to hand it the next upload). The rest wait here, highest priority first,
    first come first served within a level. A request also runs at most workers // requests decodes at once (at
    least one): one over its share (others arrived) starts nothing new until it is within it again.

    `urgent` is the pool for `high` requests. The main pool's threads run at a lowered scheduling priority so that
    they fill the inference threads' gaps; under load that makes a decode wait tens of milliseconds for a core.
    The urgent pool's threads run at normal priority, so a high request's decode competes for the cores as an
    equal and does not queue behind normal uploads.
    """

    def __init__(self, pool: Executor, workers: int, urgent: Executor | None = None, urgent_workers: int = 1) -> None:
        workers = max(1, workers)
        self.main = Lane(pool, workers, 2 * workers)
        self.urgent = Lane(urgent, urgent_workers, 2 * urgent_workers) if urgent is not None else self.main
        self._arrivals = itertools.count()

    def lane(self, priority: Priority) -> Lane:
        return self.urgent if priority >= Priority.HIGH else self.main

    @asynccontextmanager
    async def request(self, priority: Priority = Priority.NORMAL) -> AsyncIterator[Run]:
        """One request's access to its lane, for the duration of the block: yields its `run`."""
        lane, key = self.lane(priority), object()
        lane.running[key] = 0
        try:
            yield partial(self._run, lane, key, -int(priority))
        finally:
            del lane.running[key]
            lane.admit()  # the others' shares grew

    async def _run(self, lane: Lane, key: object, rank: int, fn: Callable[..., Any], *args: Any) -> Any:
        ticket = asyncio.get_running_loop().create_future()
        heapq.heappush(lane.waiting, (rank, next(self._arrivals), key, ticket))
        lane.admit()
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():  # admitted, then cancelled before it started
                lane.leave(key)
            raise
        try:
            return await asyncio.get_running_loop().run_in_executor(lane.pool, fn, *args)
        finally:
            lane.leave(key)


def image_error(exc: Exception) -> HTTPException:
    """The HTTP error for an image that failed to decode (400), is too large (413) or broke the decoder (500).

    Each is that image's own error: in a request with several images the others are still answered.
    """
    if isinstance(exc, ImageTooLargeError):
        return HTTPException(413, detail=f"{exc} (VITAE_MAX_IMAGE_PIXELS)")
    if isinstance(exc, ImageDecodeError):
        message = str(exc)
        if "accepted" not in message.lower():
            message += f"; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        return HTTPException(400, detail=message)
    log.error("preparing an image failed unexpectedly", exc_info=exc)
    return HTTPException(500, detail=f"preparing this image failed unexpectedly ({type(exc).__name__})")


async def prepare_all(
    state: Any,
    served: ServedArtifacts,
    uploads: list[bytes],
    keep_original: bool,
    decoder: Any = None,
    priority: Priority = Priority.NORMAL,
) -> list[PreparedImage | HTTPException]:
    """Every upload -> its model input, or its own HTTPException; `decoder` (a GpuDecoder) takes the JPEGs first.

    `state` is the ServiceState (its settings and decode shares); `priority` orders the uploads' turn in the pool.
    """
    prepare = partial(
        prepare_image,
        prep=served.preprocessing,
        max_pixels=state.settings.max_image_pixels,
        cam_max_side=state.settings.cam_max_side if keep_original else None,
    )
    async with state.decoding.request(priority) as run:
        on_device = [None] * len(uploads)
        if decoder is not None and not keep_original:
            on_device = await decode_on_device(run, decoder, uploads)
        prepared = await asyncio.gather(
            *(
                prepare_one(run, prepare, data, index) if on_device[index] is None else ready(on_device[index])
                for index, data in enumerate(uploads)
            ),
            return_exceptions=True,
        )
    return [image_error(p) if isinstance(p, Exception) else p for p in prepared]


async def ready(pixels: Any) -> PreparedImage:
    return PreparedImage(pixels, None)


async def decode_on_device(run: Run, decoder: Callable[[list[bytes]], list], uploads: list[bytes]) -> list:
    """The GPU decoder's model inputs for `uploads`, in one call; None for each one the PIL path must take."""
    with step("decode", **{"vitae.images": len(uploads), "vitae.decoder": str(decoder.device)}):
        try:
            return await run(decoder, uploads)
        except Exception as exc:  # the device path failing as a whole (e.g. out of memory): PIL takes them all
            log.warning(
                "decoding on %s failed (%s: %s); PIL decodes these uploads", decoder.device, type(exc).__name__, exc
            )
            return [None] * len(uploads)


async def prepare_one(run: Run, prepare: Callable[[bytes], PreparedImage], data: bytes, index: int) -> PreparedImage:
    """One upload through `prepare` in the pool, as a `decode` step naming the image's pixel size."""
    with step("decode", **{"vitae.image.index": index, "vitae.image.bytes": len(data)}) as span:
        image = await run(prepare, data)
        if span.is_recording():
            span.set_attributes(pixel_size(data))
        return image


def pixel_size(data: bytes) -> dict[str, int]:
    """The upload's width and height as stored, as span attributes."""
    width, height = stored_size(data)
    return {"vitae.image.width": width, "vitae.image.height": height}
