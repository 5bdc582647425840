"""The bearer token of ``/v1``: checked before anything reads or parses a request body.

:class:`TokenGate` is plain ASGI middleware, so a client without the token gets its 401
from the headers alone: it cannot make the server read (up to ``RAGQ_HTTP_MAX_BODY_BYTES``)
or parse a body, and never learns from a 422 what the body should have been. The route
dependency of :func:`bearer_dependency` checks again and puts the scheme in the OpenAPI
document.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

UNAUTHORIZED = "missing or wrong bearer token"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def token_matches(authorization: str, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time in the token's content."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def authorized(request: Request, token: str) -> bool:
    return not token or token_matches(request.headers.get("authorization", ""), token)


class TokenGate:
    """Answer 401 to a ``/v1`` request without the token, before its body is received."""

    def __init__(self, app: ASGIApp, token: str, prefix: str = "/v1") -> None:
        self.app = app
        self.token = token
        self.prefix = prefix

    def _guarded(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.token and self._guarded(scope.get("path", ""))
                and not token_matches(Headers(scope=scope).get("authorization", ""), self.token)):
            await JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers=CHALLENGE)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def bearer_dependency(token: str) -> Callable[..., Any]:
    """A route dependency requiring the token when one is set (and declaring it in OpenAPI)."""
    scheme = HTTPBearer(auto_error=False, description="The server's RAGQ_API_TOKEN, when it sets one.")
    expected = token.encode("utf-8")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if not expected:
            return
        given = credentials.credentials.encode("utf-8") if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, UNAUTHORIZED, headers=CHALLENGE)

    return require_token
