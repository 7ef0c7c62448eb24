"""How urgent a request is, how long it may take, and whether the response cache may answer it.

From its headers (`X-Priority`, `X-Request-Timeout`, `Cache-Control`) for every route, and for a v2 infer request
also from its `priority` and `timeout` parameters, which win over the headers. The deadline is never later than
the server's own VITAE_REQUEST_TIMEOUT_S.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .jobs import Priority

PRIORITIES = ", ".join(level.name.lower() for level in sorted(Priority, reverse=True))


@dataclass(frozen=True)
class RequestPolicy:
    arrived: float  # time.monotonic() when the request's handling began
    deadline: float  # time.monotonic(); arrived + min(asked timeout, VITAE_REQUEST_TIMEOUT_S)
    priority: Priority = Priority.NORMAL
    use_cache: bool = True  # False on `Cache-Control: no-cache`: computed afresh (and the fresh answer kept)


def parse_priority(value: Any, where: str) -> Priority:
    """'high' | 'normal' | 'low' (any case) -> Priority; ValueError naming `where` and what is accepted."""
    if isinstance(value, str) and value.strip().upper() in Priority.__members__:
        return Priority[value.strip().upper()]
    raise ValueError(f"{where} must be one of {PRIORITIES}, got {value!r}")


def parse_timeout(value: Any, where: str) -> float:
    """A positive, finite number of seconds (a number, or its text) -> float; ValueError naming `where`."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            pass
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{where} must be a number of seconds greater than 0 (e.g. 2.5), got {value!r}")
    return seconds


def no_cache(cache_control: str | None) -> bool:
    """Whether a Cache-Control header asks for a fresh answer (no-cache or no-store)."""
    directives = {part.strip().split("=")[0].lower() for part in (cache_control or "").split(",")}
    return bool(directives & {"no-cache", "no-store"})


def policy_from_headers(headers: Mapping[str, str], limit_s: float, arrived: float | None = None) -> RequestPolicy:
    """The policy the headers ask for; ValueError naming the header and what it accepts."""
    arrived = time.monotonic() if arrived is None else arrived
    priority = headers.get("x-priority")
    timeout = headers.get("x-request-timeout")
    timeout_s = limit_s if timeout is None else min(limit_s, parse_timeout(timeout, "the X-Request-Timeout header"))
    return RequestPolicy(
        arrived=arrived,
        deadline=arrived + timeout_s,
        priority=Priority.NORMAL if priority is None else parse_priority(priority, "the X-Priority header"),
        use_cache=not no_cache(headers.get("cache-control")),
    )


def with_parameters(policy: RequestPolicy, parameters: Mapping[str, Any], limit_s: float) -> RequestPolicy:
    """A v2 request's `priority` and `timeout` (seconds) parameters over its headers' policy; ValueError when bad."""
    changes: dict[str, Any] = {}
    if parameters.get("priority") is not None:
        changes["priority"] = parse_priority(parameters["priority"], "parameters.priority")
    if parameters.get("timeout") is not None:
        timeout_s = min(limit_s, parse_timeout(parameters["timeout"], "parameters.timeout"))
        changes["deadline"] = policy.arrived + timeout_s
    return replace(policy, **changes) if changes else policy
