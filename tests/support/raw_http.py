"""HTTP spoken over a raw socket: requests no well-behaved client would send, and reading what comes back."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def read_response(sock: socket.socket, timeout: float = 30.0) -> RawResponse | None:
    """Read one HTTP response off a raw socket until the server closes it; None when it closed without one."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return RawResponse(int(status_line.split()[1]), headers, body)


def raw_request(url: str, payload: bytes, timeout: float = 30.0) -> RawResponse | None:
    """Send bytes as they are (no client-side checks) and read the answer of a server that closes after it."""
    with socket.create_connection(host_port(url)) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before taking it all
            pass
        return read_response(sock, timeout)


def multipart(*images: bytes, boundary: str = "b") -> tuple[bytes, str]:
    """A multipart/form-data body with one 'file' part per image, and its content type."""
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="i{i}"\r\n'.encode()
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + image
        + b"\r\n"
        for i, image in enumerate(images)
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
