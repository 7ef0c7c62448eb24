"""The protocol's errors: one exception carrying its HTTP status, and the error object it answers with."""

from __future__ import annotations


class ProtocolError(ValueError):
    """The request breaks the protocol or does not fit the model; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object."""
    return {"error": message}
