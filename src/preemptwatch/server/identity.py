"""GCP identity tokens as credentials: a GCE VM (its sidecar, or a run on it) presents
the token its metadata server issues
(``instance/service-accounts/default/identity?audience=AUD&format=full``); the server
checks it with google-auth (RS256 signature against the configured certificates,
audience, issuer, expiry) and takes the instance ID from the token's
``google.compute_engine.instance_id`` claim.

Certificates come from a URL (Google's ``https://www.googleapis.com/oauth2/v1/certs``,
a ``{key id: PEM certificate}`` map; a JWKS ``{"keys": [...]}`` document works too) or a
file of either form. URLs are fetched with aiohttp and cached for the ``max-age`` the
answer gives (an hour by default); a token signed with an unknown key ID triggers one
early refetch, at most every ``min_refetch`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from ..errors import ConfigError

log = logging.getLogger("preemptwatch.server")

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


class IdentityError(Exception):
    """The token is not acceptable (forged, expired, wrong audience, not a GCE VM's).
    The server answers 401."""


class CertificatesUnavailable(Exception):
    """The certificates could not be loaded (the server answers 503: try again)."""


@dataclass(frozen=True)
class Identity:
    """Who presented a valid token."""

    instance_id: str
    project_id: str | None
    zone: str | None
    instance_name: str | None
    subject: str
    email: str | None


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts with a JSON header naming an algorithm: tell a token
    from an API key without verifying it."""
    parts = token.split(".")
    if len(parts) != 3 or not all(re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in parts):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except ValueError:
        return False
    return isinstance(header, dict) and "alg" in header


def _b64int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def parse_certificates(data: Any) -> dict[str, str]:
    """``{key id: PEM}`` from a Google v1 certificate map or a JWKS document."""
    if isinstance(data, Mapping) and isinstance(data.get("keys"), list):
        certs: dict[str, str] = {}
        for key in data["keys"]:
            if not isinstance(key, Mapping) or key.get("kty") != "RSA" or "kid" not in key:
                continue
            public = rsa.RSAPublicNumbers(_b64int(key["e"]), _b64int(key["n"])).public_key()
            pem = public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            certs[str(key["kid"])] = pem.decode()
        return certs
    if isinstance(data, Mapping) and all(
        isinstance(v, str) and "-----BEGIN" in v for v in data.values()
    ):
        return {str(k): v for k, v in data.items()}
    raise ValueError("certificates must be a {key id: PEM} map or a JWKS {'keys': [...]}")


def _max_age(cache_control: str | None, default: float) -> float:
    match = re.search(r"max-age=(\d+)", cache_control or "")
    return float(match.group(1)) if match else default


class IdentityVerifier:
    """Verifies GCP identity tokens for ``audience`` against ``certs`` (URL or file).

    ``projects``, when given, limits tokens to VMs of those GCP project IDs.
    """

    def __init__(
        self,
        audience: str | Sequence[str],
        certs: str = GOOGLE_CERTS_URL,
        *,
        projects: Sequence[str] = (),
        issuers: Sequence[str] = GOOGLE_ISSUERS,
        clock_skew: int = 10,
        default_max_age: float = 3600.0,
        min_refetch: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences or not all(audiences):
            raise ValueError("identity tokens need an audience (the URL clients ask for)")
        self.audiences = audiences
        self.source = certs
        self.is_url = certs.startswith(("http://", "https://"))
        if not self.is_url and not Path(certs).is_file():
            raise ValueError(f"certificates {certs!r} are neither an http(s) URL nor a file")
        self.projects = frozenset(projects)
        self.issuers = frozenset(issuers)
        self.clock_skew = clock_skew
        self.default_max_age = default_max_age
        self.min_refetch = min_refetch
        self.timeout = timeout
        self._certs: dict[str, str] = {}
        self._expires = 0.0
        self._fetched = float("-inf")
        self._mtime: float | None = None
        self._lock = asyncio.Lock()

    async def certificates(self, refresh: bool = False) -> dict[str, str]:
        """The current certificates (cached)."""
        async with self._lock:
            if self.is_url:
                now = time.monotonic()
                stale = now >= self._expires
                early = refresh and now - self._fetched >= self.min_refetch
                if not self._certs or stale or early:
                    await self._fetch()
            else:
                self._read_file()
            return self._certs

    async def _fetch(self) -> None:
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((aiohttp.ClientError, asyncio.TimeoutError)),
                wait=wait_random_exponential(multiplier=0.2, max=2),
                stop=stop_after_attempt(3),
                reraise=True,
            ):
                with attempt:
                    timeout = aiohttp.ClientTimeout(total=self.timeout)
                    async with (
                        aiohttp.ClientSession(timeout=timeout) as session,
                        session.get(self.source) as resp,
                    ):
                        resp.raise_for_status()
                        data = await resp.json(content_type=None)
                        max_age = _max_age(resp.headers.get("Cache-Control"), self.default_max_age)
            certs = parse_certificates(data)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._fetched = time.monotonic()
            if self._certs:  # keep serving with the old ones
                log.warning("could not refresh identity certificates: %s", exc)
                return
            raise CertificatesUnavailable(
                f"identity certificates from {self.source}: {exc}"
            ) from exc
        self._certs = certs
        self._fetched = time.monotonic()
        self._expires = self._fetched + max_age

    def _read_file(self) -> None:
        path = Path(self.source)
        try:
            mtime = path.stat().st_mtime
            if mtime != self._mtime:
                self._certs = parse_certificates(json.loads(path.read_text()))
                self._mtime = mtime
        except (OSError, ValueError) as exc:
            if not self._certs:
                raise CertificatesUnavailable(f"identity certificates in {path}: {exc}") from exc
            log.warning("could not reread identity certificates: %s", exc)

    async def verify(self, token: str) -> Identity:
        """The identity in ``token``; `IdentityError` when it is not acceptable."""
        try:
            header = jwt.decode_header(token)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"not a JWT: {exc}") from None
        certs = await self.certificates()
        if header.get("kid") and header["kid"] not in certs:
            certs = await self.certificates(refresh=True)
        try:
            claims = jwt.decode(
                token,
                certs=certs,
                audience=self.audiences,
                clock_skew_in_seconds=self.clock_skew,
            )
        except (ValueError, TypeError) as exc:  # google-auth's errors are ValueErrors
            raise IdentityError(f"identity token refused: {exc}") from None
        if claims.get("iss") not in self.issuers:
            raise IdentityError(f"identity token from unexpected issuer {claims.get('iss')!r}")
        engine = (claims.get("google") or {}).get("compute_engine") or {}
        instance_id = engine.get("instance_id")
        if not isinstance(instance_id, str) or not instance_id:
            raise IdentityError(
                "identity token has no google.compute_engine.instance_id claim "
                "(request it with format=full)"
            )
        project = engine.get("project_id")
        if self.projects and project not in self.projects:
            raise IdentityError(f"identity token from GCP project {project!r}, not allowed here")
        return Identity(
            instance_id=instance_id,
            project_id=project,
            zone=engine.get("zone"),
            instance_name=engine.get("instance_name"),
            subject=str(claims.get("sub", "")),
            email=claims.get("email"),
        )


#: Request key of the verified identity (set when a request authenticated with a token).
IDENTITY = web.RequestKey("preemptwatch_gcp_identity", Identity)


class GCPIdentityAuth:
    """Authenticator (see `server.auth`): a bearer token that is a JWT is verified as a
    GCP identity token; a valid one acts in ``project`` (created when missing). Such a
    caller may act only for its own instance: marking another one
    (``POST /api/v1/instances/{id}/preempting``) or creating a run that names another
    ``instance_id`` is 403. A forged, expired or wrong-audience token gets 401;
    unreachable certificates 503."""

    def __init__(self, verifier: IdentityVerifier, store: Any, project: str = "default") -> None:
        self.verifier = verifier
        self.store = store
        self.project = project
        self._project: Any = None

    async def __call__(self, request: web.Request) -> Any:
        from .auth import bearer_token

        token = bearer_token(request)
        if token is None or not looks_like_jwt(token):
            return None
        try:
            identity = await self.verifier.verify(token)
        except IdentityError as exc:
            log.warning("refused identity token from %s: %s", request.remote, exc)
            raise web.HTTPUnauthorized(reason=str(exc)[:200]) from None
        except CertificatesUnavailable as exc:
            log.error("%s", exc)
            raise web.HTTPServiceUnavailable(reason="identity certificates unavailable") from None
        target = request.match_info.get("instance_id")
        if target is None and request.method == "POST" and request.path == "/api/v1/runs":
            target = await _claimed_instance(request)
        if target is not None and target != identity.instance_id:
            raise web.HTTPForbidden(
                reason=f"the token of instance {identity.instance_id} may not act for "
                f"instance {target}"
            )
        request[IDENTITY] = identity
        return await self._project_row()

    async def _project_row(self) -> Any:
        if self._project is not None:
            return self._project
        from .schema import projects
        from .store import Project

        async def find() -> Any:
            async with self.store.db.read() as conn:
                return (
                    await conn.execute(
                        sa.select(projects.c.id, projects.c.name).where(
                            projects.c.name == self.project
                        )
                    )
                ).first()

        row = await find()
        if row is None:
            try:
                async with self.store.db.write() as conn:
                    await conn.execute(
                        sa.insert(projects).values(name=self.project, created_at=time.time())
                    )
            except sa.exc.IntegrityError:
                pass  # another replica created it meanwhile
            row = await find()
        self._project = Project(row.id, row.name)
        return self._project


async def _claimed_instance(request: web.Request) -> str | None:
    """The ``instance_id`` a run-creating request claims (the body stays readable for
    the handler, which reports malformed bodies itself)."""
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, web.HTTPRequestEntityTooLarge):
        return None
    claimed = body.get("instance_id") if isinstance(body, dict) else None
    return str(claimed) if claimed is not None else None


def install_identity_auth(app: web.Application) -> None:
    """Add `GCPIdentityAuth` to the server app when its config names an audience."""
    from .app import CONTEXT

    ctx = app[CONTEXT]
    audience = ctx.config.gcp_identity_audience
    if not audience:
        return
    project = ctx.config.gcp_identity_project or "default"
    if not 0 < len(project) <= 64:
        raise ConfigError("--gcp-identity-project must be 1-64 characters")
    try:
        verifier = IdentityVerifier(
            audience,
            ctx.config.gcp_identity_certs or GOOGLE_CERTS_URL,
            projects=ctx.config.gcp_identity_projects,
        )
    except ValueError as exc:
        raise ConfigError(f"--gcp-identity-certs: {exc}") from None
    ctx.authenticators.insert(0, GCPIdentityAuth(verifier, ctx.store, project))
    log.info("accepting GCP identity tokens for %s (project %s)", audience, project)
