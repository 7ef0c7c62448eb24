"""The response cache: answers to repeated images, kept in memory, bounded in bytes, least recently used evicted.

A key is a hash of everything that decides an answer: the route's kind, the served model's identity (name,
version and the digest of its artifacts' metadata, which records every file's sha256), the options that change
the answer, and the uploaded bytes. A new version, or other weights under the same name and version, never
meets an old answer. The path of one request:
  1. key          `cache_key` over the model, the options and the uploads (no decoding)
  2. hit          the stored answer, marked most recently used; nothing is decoded or computed
  3. wait         an identical request is being computed: wait for it, then read its answer (single-flight);
                  when that computation failed or was not kept, this request computes itself
  4. miss         compute; the answer is kept when the computation says its size (a whole success), and the
                  least recently used answers are evicted until the bytes fit VITAE_CACHE_MB
`Cache-Control: no-cache` skips steps 2-3: the answer is computed afresh and replaces the kept one.
With VITAE_CACHE_MB=0 the cache keeps nothing and every answer is computed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from .artifacts import ServedArtifacts
from .metrics import Metrics

V = TypeVar("V")
# Bytes an entry costs beyond its value and key (the dict slot, the tuple, the objects' headers).
ENTRY_OVERHEAD = 200

# The response header that says where an answer came from, and its values.
CACHE_HEADER = "X-Cache"
HIT, MISS, BYPASS, OFF = "hit", "miss", "bypass", "off"

Compute = Callable[[], Awaitable[tuple[V, int | None]]]  # -> (answer, its size to keep it, or None: keep it not)


def cache_key(kind: str, served: ServedArtifacts, options: Sequence[Any], blobs: Sequence[bytes]) -> bytes:
    """sha256 over the route's kind, the model's identity, the answer-changing options and every upload."""
    digest = hashlib.sha256()
    identity = (kind, served.name, served.version, served.metadata.content_sha256, tuple(options))
    digest.update(repr(identity).encode())
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "little"))  # lengths keep [ab, c] and [a, bc] apart
        digest.update(blob)
    return digest.digest()


class ResponseCache(Generic[V]):
    """Answers by key, at most `max_bytes` of them, least recently used evicted first; 0 bytes: disabled."""

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self._computing: dict[bytes, asyncio.Future] = {}  # key -> resolved when its computation ends
        self.waiting = 0  # requests waiting for an identical one being computed

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    async def answer(self, key: bytes, compute: Compute, *, lookup: bool = True) -> tuple[V, str]:
        """(answer, where it came from: hit | miss | bypass | off); `lookup=False` computes afresh and keeps it."""
        if not self.enabled:
            value, _ = await compute()
            return value, OFF
        if not lookup:
            value, size = await compute()
            self._keep(key, value, size)
            return value, BYPASS
        while (running := self._computing.get(key)) is not None and key not in self._entries:
            self.waiting += 1
            try:
                await asyncio.shield(running)  # this request's own deadline still applies while it waits
            finally:
                self.waiting -= 1
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self._count("hits")
            return entry[0], HIT
        self._count("misses")
        done = asyncio.get_running_loop().create_future()
        self._computing[key] = done
        try:
            value, size = await compute()
            self._keep(key, value, size)
            return value, MISS
        finally:
            del self._computing[key]
            done.set_result(None)  # waiters read the kept answer, or compute themselves

    def _keep(self, key: bytes, value: V, size: int | None) -> None:
        if size is None:
            return
        cost = size + len(key) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[key] = (value, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
            self._count("evictions")
        if self.metrics:
            self.metrics.cache_bytes.set(self.bytes)
            self.metrics.cache_entries.set(len(self._entries))

    def _count(self, what: str) -> None:
        if self.metrics:
            getattr(self.metrics, f"cache_{what}").inc()
