"""Errors of the server: `ServeError` for a bad command line (the CLI's one line, exit 2) and
`APIError` for a refused HTTP request, answered in OpenAI's error shape (never a traceback)."""

from __future__ import annotations

from dataclasses import dataclass, field


class ServeError(ValueError):
    """A server option or model the server cannot run with; the message is one line."""


@dataclass
class APIError(Exception):
    """An HTTP error the client can act on: status, message, OpenAI error type, the field at
    fault (`param`), a short `code`, and extra headers (Retry-After)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, "invalid_value")
