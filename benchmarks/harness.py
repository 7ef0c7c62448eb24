"""What the benchmarks share to run a server and load it (no figures are computed here).

- a free local port, and the environment of a `python -m service` on it (`service_env`);
- a server process started in its own process group and polled until ready (`start`, `wait_ready`), stopped with
  its workers (`stop`), and its CPU time read from /proc (`cpu_seconds`; by thread role, `thread_cpu_seconds`);
- a metric's total over its series, read from the service's /metrics (`metric_total`);
- real JPEG photos to send (`real_jpegs`);
- a closed-loop client: N clients, each sending its next request when the last one is answered (`closed_loop`
  with httpx; `lean_closed_loop` with one bare keep-alive connection per client, `LeanConnection`, for benchmarks
  whose load generator must leave the server's cores to the server);
- a version of a model published into a model repository the way the poller expects (`publish_version`).

The scripts put `benchmarks/` on sys.path and import this as `harness`; tests import it as `benchmarks.harness`.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A local TCP port free at the time of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_env(artifacts: Path, port: int, **settings: object) -> dict[str, str]:
    """The environment of a `python -m service` that serves `artifacts` as they are on 127.0.0.1:`port`;
    each keyword is one more setting, e.g. backend="openvino" -> VITAE_BACKEND=openvino."""
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "VITAE_LOG_LEVEL": "warning",
        "VITAE_ARTIFACTS": str(artifacts),
        "VITAE_AUTO_EXPORT": "false",
        "VITAE_HOST": "127.0.0.1",
        "VITAE_PORT": str(port),
    }
    return env | {f"VITAE_{name.upper()}": str(value) for name, value in settings.items()}


class ServerFailed(RuntimeError):
    """The server started but its model failed to load; the message is its /readyz detail."""


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer ready before the deadline."""


def wait_ready(
    url: str,
    *,
    ready_path: str = "/readyz",
    timeout: float = 600.0,
    interval: float = 0.5,
    exited: Callable[[], bool] = lambda: False,
) -> dict:
    """Poll `url + ready_path` until it answers 200 and return its JSON body ({} when it is not JSON).

    Raises ServerFailed when the body says `"status": "failed"`, ServerNotReady when `exited()` turns true or
    `timeout` seconds pass; a refused connection (the server still binding its port) is polled again.
    """
    deadline = time.monotonic() + timeout
    seen = "no answer"
    while True:
        if exited():
            raise ServerNotReady("exited")
        try:
            response = httpx.get(f"{url}{ready_path}")
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            if response.status_code == 200:
                return body
            if body.get("status") == "failed":
                raise ServerFailed(body.get("detail", "failed to load"))
            seen = f"{response.status_code} {body or response.text[:200]}"
        except httpx.TransportError as exc:
            seen = f"{type(exc).__name__}"
        if time.monotonic() > deadline:
            raise ServerNotReady(f"did not become ready in {timeout:g} s (last answer: {seen})")
        time.sleep(interval)


def start(
    command: list[str], env: dict[str, str], port: int, log: Path, ready_path: str, timeout: float = 600.0
) -> subprocess.Popen:
    """Run `command` in its own process group, its output in `log`, and wait until it answers ready."""
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        url, exited = f"http://127.0.0.1:{port}", lambda: process.poll() is not None
        wait_ready(url, ready_path=ready_path, timeout=timeout, exited=exited)
    except ServerFailed:
        stop(process)
        raise
    except ServerNotReady as exc:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit(f"{command[:3]} {exc}; see {log}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (LitServe runs its workers as child processes)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc .../stat file after the command (state, ppid, pgrp, ...); None once it is gone."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_of(fields: list[str]) -> float:
    """User + system CPU seconds of stat_fields()."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(group: int) -> float:
    """User + system CPU time of every process in a process group (a server and its workers), Linux only."""
    processes = (stat_fields(stat) for stat in Path("/proc").glob("[0-9]*/stat"))
    return sum(cpu_of(fields) for fields in processes if fields is not None and int(fields[2]) == group)


THREAD_ROLES = ("event loop", "decode", "CAM pictures", "batch workers", "engine")  # thread_cpu_seconds' keys


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of process `pid`'s threads by role, from their kernel names (service.threads):
    "event loop" (the main thread), "decode" (vitae-decode), "CAM pictures" (vitae-cam), "batch workers" (other
    vitae-* threads) and "engine" (every other thread: those the inference runtime started). Linux only; threads that
    ended are not counted."""
    roles = dict.fromkeys(THREAD_ROLES, 0.0)
    for task in Path(f"/proc/{pid}/task").glob("[0-9]*"):
        try:
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we read
            continue
        fields = stat_fields(task / "stat")
        if fields is None:
            continue
        if int(task.name) == pid:
            role = "event loop"
        elif comm.startswith("vitae-decode"):
            role = "decode"
        elif comm.startswith("vitae-cam"):
            role = "CAM pictures"
        elif comm.startswith("vitae-"):
            role = "batch workers"
        else:
            role = "engine"
        roles[role] += cpu_of(fields)
    return roles


def metric_total(url: str, name: str) -> float | None:
    """The sum of Prometheus metric `name`'s series at `url`/metrics; None where the server has no /metrics."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in response.text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


def real_jpegs(count: int) -> list[bytes]:
    """Real photos shipped inside installed packages (scikit-learn, matplotlib), re-encoded at a few sizes."""
    from PIL import Image

    found = []
    for package, relative in (
        ("sklearn", "datasets/images/china.jpg"),
        ("sklearn", "datasets/images/flower.jpg"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ):
        try:
            module = __import__(package)
        except ImportError:
            continue
        path = Path(module.__file__).parent / relative
        if path.is_file():
            found.append(Image.open(path).convert("RGB"))
    if not found:
        raise SystemExit("no real JPEG photos found (install scikit-learn or matplotlib, the dev extras)")
    out = []
    for i in range(count):
        photo = found[i % len(found)]
        scale = (1.0, 0.8, 0.6, 1.25)[(i // len(found)) % 4]
        width, height = (round(side * scale) for side in photo.size)
        buffer = io.BytesIO()
        photo.resize((width, height)).save(buffer, format="JPEG", quality=85 + i % 10)
        out.append(buffer.getvalue())
    return out


@dataclass
class Loop:
    """What a closed loop saw: the latency of every 200 answer, the requests that got none, its wall time."""

    latencies_s: list[float]
    errors: int
    elapsed_s: float


Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def closed_loop(http: httpx.AsyncClient, clients: int, total: int, send: Send) -> Loop:
    """`clients` clients share `total` requests, each sending its next when the last is answered; `send(http, i)`
    sends the i-th. A status other than 200 or a dropped connection counts as an error, not as a latency."""
    latencies: list[float] = []
    errors = 0
    sent = 0

    async def client() -> None:
        nonlocal sent, errors
        while sent < total:
            index, sent = sent, sent + 1
            started = time.perf_counter()
            try:
                response = await send(http, index)
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Loop(latencies, errors, time.perf_counter() - started)


def publish_version(repository: Path, name: str, version: str, artifacts: Path, *, truncate_onnx: bool = False) -> Path:
    """Copy an artifacts folder into `repository/name/version` atomically: under a hidden name, then renamed, so a
    poller never sees it half-copied. `truncate_onnx` publishes a broken version (its model.onnx cut in half)."""
    incoming = repository / name / f".incoming-{version}"
    shutil.copytree(artifacts, incoming, ignore=shutil.ignore_patterns("openvino_cache", ".*"))
    if truncate_onnx:
        onnx = incoming / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    return incoming.rename(repository / name / version)


class LeanConnection:
    """One keep-alive HTTP/1.1 connection that sends prepared requests and reads their answers, nothing else.

    A load generator on the server's own cores takes CPU from it: httpx spends ~5 ms per request on two cores,
    this ~0.3 ms, so the figures measure the server rather than the client. Answers with Content-Length or chunked.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        """Send one request on this connection (opened on first use, again after the server closed it)."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {target} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        try:
            return await self._answer()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise

    async def _answer(self) -> tuple[int, bytes]:
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            body = await self.reader.readexactly(int(fields.get("content-length", 0)))
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None


Prepared = tuple[str, str, dict[str, str], bytes]  # method, target (path and query), headers, body


async def lean_closed_loop(host: str, port: int, clients: int, total: int, prepared: Callable[[int], Prepared]) -> Loop:
    """closed_loop with one LeanConnection per client; `prepared(i)` is the i-th request."""
    latencies: list[float] = []
    errors = 0
    sent = 0

    async def client() -> None:
        nonlocal sent, errors
        connection = LeanConnection(host, port)
        try:
            while sent < total:
                index, sent = sent, sent + 1
                started = time.perf_counter()
                try:
                    status, _ = await connection.request(*prepared(index))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Loop(latencies, errors, time.perf_counter() - started)


def multipart_body(field: str, filename: str, data: bytes, content_type: str) -> tuple[dict[str, str], bytes]:
    """One file as multipart/form-data: (headers, body)."""
    boundary = "vitae-bench-boundary"
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"content-type: {content_type}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, head + data + tail
