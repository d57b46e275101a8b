"""No network for a test: every socket connect and DNS lookup raises `NetworkBlocked` (and is
recorded), so a feature that claims to work offline is shown to, not assumed to."""

from __future__ import annotations

import socket

import pytest


class NetworkBlocked(OSError):
    pass


def block_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Block sockets for the rest of the test; returns the list the attempted connections go to."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:80])
        raise NetworkBlocked("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts
