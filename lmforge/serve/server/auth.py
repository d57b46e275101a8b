"""API keys: `Authorization: Bearer <key>` compared in constant time against every configured key
(hmac.compare_digest), so the answer time says nothing about how much of a key was right."""

from __future__ import annotations

import hmac

from lmforge.serve.server.errors import APIError


def check_api_key(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Pass when no keys are configured or the header carries one of them; else a 401."""
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    given_b = given.strip().encode()
    ok = False
    for key in keys:  # every key is compared: no early exit that times which one matched
        ok |= hmac.compare_digest(given_b, key.encode())
    if scheme.lower() != "bearer" or not ok:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       "invalid_request_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
