"""Authentication: a list of authenticators tried in order; the first that recognises the
request names its project. Add one (a GCP identity token, say) by passing it to
`create_app` or appending to ``app[AUTHENTICATORS]`` before the app starts."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from .store import Project, RunStore, hash_key

#: Takes the request; returns its project, or None when it does not recognise it.
Authenticator = Callable[[web.Request], Awaitable[Project | None]]


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """``Authorization: Bearer <api key>``, looked up by hash; known keys are cached for
    ``ttl`` seconds so heartbeats do not hit the database for it."""

    def __init__(self, store: RunStore, ttl: float = 60.0) -> None:
        self.store = store
        self.ttl = ttl
        self._cache: dict[str, tuple[Project, float]] = {}

    async def __call__(self, request: web.Request) -> Project | None:
        token = bearer_token(request)
        if token is None:
            return None
        digest = hash_key(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        project = await self.store.project_for_key(token)
        if project is not None:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (project, now + self.ttl)
        return project
