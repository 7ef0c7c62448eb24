"""Replicas behind Debian's nginx replaced one by one under a steady stream: no request fails.

Two `python -m service` processes behind nginx, proxying as the compose file's load balancer does (its
`location /` block from docker/nginx.conf). Each replica in turn gets SIGTERM (it drains: /readyz 503, then the
port closes, open requests finish) and a new one starts on its port with the model's next version. Every answer
names the version that computed it, and nginx's X-Upstream header names the replica.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.checkpoints import ROOT

from benchmarks.harness import free_port, publish_version, real_jpegs, service_env, start, stop, wait_ready

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK), reason="Debian's nginx is not installed (`make test` installs it)"
)
DEADLINE_S = 120


def compose_location() -> str:
    """The `location /` block of the compose file's load balancer, with the replica's address added to answers."""
    text = (ROOT / "docker" / "nginx.conf").read_text()
    block = re.search(r"location / \{.*?\n    \}", text, re.S).group(0)
    return block.replace(
        "proxy_pass http://vitae;", "proxy_pass http://vitae;\n        add_header X-Upstream $upstream_addr always;"
    )


def nginx_conf(folder: Path, port: int, replicas: list[int]) -> Path:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in replicas)
    temp = "\n".join(
        f"    {kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
    upstream vitae {{
{servers}
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 21m;
        {compose_location()}
    }}
}}
"""
    path = folder / "nginx.conf"
    path.write_text(conf)
    return path


def replica(artifacts: Path, repo: Path, port: int, log: Path) -> subprocess.Popen:
    env = service_env(artifacts, port, model_repository=repo, backend="onnxruntime", device="cpu", threads=1)
    env |= {"VITAE_DRAIN_GRACE_S": "0.5", "VITAE_PREPROCESS_THREADS": "1"}
    return start([sys.executable, "-m", "service"], env, port, log, "/readyz", timeout=DEADLINE_S)


async def stream(url: str, photo: bytes, stop_sending: asyncio.Event, answers: list) -> None:
    """One client sending its next request when the last is answered: (status, version, replica port, sent)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not stop_sending.is_set():
            sent = time.monotonic()
            response = await http.post("/classify", files={"file": ("photo.jpg", photo, "image/jpeg")})
            upstream = response.headers.get("x-upstream", "").split(",")[-1].strip()
            version = response.json().get("model", {}).get("version") if response.status_code == 200 else None
            answers.append((response.status_code, version, int(upstream.rsplit(":", 1)[-1] or 0), sent))


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def replace_each(url: str, replicas: dict, artifacts: Path, repo2: Path, logs: Path) -> tuple[list, dict]:
    answers: list = []
    replaced: dict[int, tuple[float, float]] = {}  # port -> (SIGTERM sent, new replica ready)
    stop_sending = asyncio.Event()
    clients = asyncio.gather(*(stream(url, photo, stop_sending, answers) for photo in real_jpegs(3)))
    try:
        await until(lambda: len(answers) >= 30, "thirty answers before the first replacement")
        for port in list(replicas):
            stopping = time.monotonic()
            await asyncio.to_thread(stop, replicas[port])
            replicas[port] = await asyncio.to_thread(replica, artifacts, repo2, port, logs / f"{port}-v2.log")
            replaced[port] = (stopping, time.monotonic())
            seen = len(answers)
            await until(
                lambda p=port, seen=seen: (
                    any(a[2] == p and a[3] >= replaced[p][1] for a in answers) and len(answers) >= seen + 30
                ),
                f"answers from the new replica on {port}",
            )
    finally:
        stop_sending.set()
        await clients
    return answers, replaced


def test_replicas_replaced_in_turn_behind_nginx_fail_no_request(tmp_path, artifacts):
    repo1, repo2 = tmp_path / "v1", tmp_path / "v2"
    for repo, version in ((repo1, "1"), (repo2, "2")):
        (repo / "tiny").mkdir(parents=True)
        publish_version(repo, "tiny", version, artifacts)
    ports = [free_port(), free_port()]
    replicas = {port: replica(artifacts, repo1, port, tmp_path / f"{port}-v1.log") for port in ports}
    lb_port = free_port()
    nginx = subprocess.Popen(
        [NGINX, "-c", str(nginx_conf(tmp_path, lb_port, ports)), "-p", str(tmp_path), "-g", "daemon off;"]
    )
    try:
        url = f"http://127.0.0.1:{lb_port}"
        wait_ready(url, timeout=30, interval=0.05, exited=lambda: nginx.poll() is not None)
        answers, replaced = asyncio.run(replace_each(url, replicas, artifacts, repo2, tmp_path))
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
        for process in replicas.values():
            stop(process)

    assert len(answers) >= 90
    failed = [a for a in answers if a[0] != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    for port, (stopping, ready) in replaced.items():
        from_port = [a for a in answers if a[2] == port]
        assert all(a[1] == "1" for a in from_port if a[3] < stopping), f"replica {port} answered version 1 before"
        assert all(a[1] == "2" for a in from_port if a[3] >= ready), f"replica {port} answers version 2 once replaced"
        versions = [a[1] for a in sorted(from_port, key=lambda a: a[3])]
        assert versions == sorted(versions), f"replica {port}: version 1 answers, then version 2, never both ways"
        assert "1" in versions and "2" in versions
