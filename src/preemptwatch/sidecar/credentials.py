"""What the sidecar presents to the server: an API key, or the VM's GCP identity token."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import aiohttp

GCP_METADATA_ROOT = "http://metadata.google.internal"

#: An async callable returning the bearer token for the next request.
TokenSource = Callable[[], Awaitable[str]]


def static_token(key: str) -> TokenSource:
    """A token source that always returns ``key`` (an API key)."""

    async def token() -> str:
        return key

    return token


class GCPIdentityToken:
    """Fetches the VM's identity token for ``audience`` from the GCE metadata server
    (``instance/service-accounts/default/identity?audience=...&format=full``), cached
    until five minutes before it expires (they live an hour)."""

    refresh_before = 300.0
    lifetime = 3600.0

    def __init__(self, audience: str, metadata_url: str | None = None, timeout: float = 2.0):
        if not audience:
            raise ValueError("a GCP identity token needs an audience (the server's URL)")
        self.audience = audience
        root = metadata_url or os.environ.get("PREEMPTWATCH_GCP_METADATA_URL") or GCP_METADATA_ROOT
        self.url = (
            root.rstrip("/") + "/computeMetadata/v1/instance/service-accounts/default/identity"
            f"?audience={quote(audience, safe='')}&format=full"
        )
        self.timeout = timeout
        self._token: str | None = None
        self._fetched = 0.0

    async def __call__(self) -> str:
        if self._token and time.monotonic() - self._fetched < self.lifetime - self.refresh_before:
            return self._token
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.get(self.url, headers={"Metadata-Flavor": "Google"}) as resp,
        ):
            body = await resp.text()
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info,
                    resp.history,
                    status=resp.status,
                    message=f"identity token: {body[:200]}",
                )
        self._token, self._fetched = body.strip(), time.monotonic()
        return self._token
