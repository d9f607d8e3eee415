"""API-key check for the OpenAI routes (`/v1/...`): `Authorization: Bearer KEY`, as OpenAI clients send.

A pure ASGI middleware, so the key is checked before the body is read or parsed: a request without
the right key gets 401 whatever its body. `/health` and `/metrics` stay open (probes and scrapers).
Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from frugal.server.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        if not api_key:
            raise ValueError("api_key must be a non-empty string")
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(PROTECTED_PREFIX) \
                or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        supplied = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                supplied = value
                break
        if supplied is None:
            response = error_response(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        elif not hmac.compare_digest(supplied.strip(), self._expected):
            response = error_response(401, "invalid API key", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)
