"""GCP identity-token verification against certificates served over local HTTP, and the
client side that fetches the token from the metadata server."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from identity_helpers import Authority

from preemptwatch.server.identity import (
    CertificatesUnavailable,
    IdentityError,
    IdentityVerifier,
    looks_like_jwt,
)
from preemptwatch.sidecar import GCPIdentityToken
from preemptwatch.simulate import serve

AUD = "https://preemptwatch.example.com"


@dataclass
class CertServer:
    """Serves ``body`` as the certificate document, counting fetches."""

    body: Any = None
    url: str = ""
    fetches: int = 0
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.body, status=self.status, headers=self.headers)


@pytest.fixture
async def certs() -> AsyncIterator[CertServer]:
    server = CertServer(headers={"Cache-Control": "public, max-age=3600"})
    app = web.Application()
    app.router.add_get("/oauth2/v1/certs", server.handle)
    runner = await serve(app)
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/oauth2/v1/certs"
    yield server
    await runner.cleanup()


async def test_a_valid_token_names_its_instance(certs: CertServer) -> None:
    ca = Authority()
    certs.body = ca.certs()
    verifier = IdentityVerifier(AUD, certs.url, projects=["proj-a"])
    token = ca.token(AUD, "7777")
    assert looks_like_jwt(token) and not looks_like_jwt("pw_0123456789abcdef")
    identity = await verifier.verify(token)
    assert identity.instance_id == "7777" and identity.project_id == "proj-a"
    assert identity.zone == "europe-west4-a" and identity.instance_name == "vm-1"
    await verifier.verify(ca.token(AUD, "8888"))
    assert certs.fetches == 1  # cached for max-age


@pytest.mark.parametrize(
    "case",
    ["forged", "expired", "audience", "issuer", "no-instance", "project", "garbage", "alg-none"],
)
async def test_bad_tokens_are_refused(certs: CertServer, case: str) -> None:
    ca = Authority()
    certs.body = ca.certs()
    verifier = IdentityVerifier(AUD, certs.url, projects=["proj-a"])
    token = {
        "forged": lambda: Authority(kid=ca.kid).token(AUD),  # same key ID, other key
        "expired": lambda: ca.token(AUD, issued=time.time() - 7200, lifetime=3600),
        "audience": lambda: ca.token("https://elsewhere.example.com"),
        "issuer": lambda: ca.token(AUD, iss="https://evil.example.com"),
        "no-instance": lambda: ca.token(AUD, google={}),
        "project": lambda: ca.token(AUD, project="proj-b"),
        "garbage": lambda: "not.a.token",
        "alg-none": lambda: _unsigned(ca.token(AUD)),
    }[case]()
    with pytest.raises(IdentityError):
        await verifier.verify(token)


def _unsigned(token: str) -> str:
    import base64

    header = base64.urlsafe_b64encode(json.dumps({"alg": "none"}).encode()).rstrip(b"=")
    return f"{header.decode()}.{token.split('.')[1]}."


async def test_key_rotation_refetches_once(certs: CertServer) -> None:
    old, new = Authority("old"), Authority("new")
    certs.body = old.certs()
    verifier = IdentityVerifier(AUD, certs.url, min_refetch=0)
    await verifier.verify(old.token(AUD))
    certs.body = {**old.certs(), **new.certs()}
    assert (await verifier.verify(new.token(AUD))).instance_id == "4242424242"
    assert certs.fetches == 2


async def test_jwks_documents_and_files_work(certs: CertServer, tmp_path: Path) -> None:
    ca = Authority()
    certs.body = ca.jwks()
    assert (await IdentityVerifier(AUD, certs.url).verify(ca.token(AUD))).instance_id
    path = tmp_path / "certs.json"
    path.write_text(json.dumps(ca.certs()))
    assert (await IdentityVerifier(AUD, str(path)).verify(ca.token(AUD, "9"))).instance_id == "9"


async def test_unreachable_certificates_are_an_outage_not_a_refusal(certs: CertServer) -> None:
    ca = Authority()
    certs.status, certs.body = 503, {"error": "down"}
    with pytest.raises(CertificatesUnavailable):
        await IdentityVerifier(AUD, certs.url).verify(ca.token(AUD))
    with pytest.raises(ValueError, match="neither"):
        IdentityVerifier(AUD, "/no/such/file.json")
    with pytest.raises(ValueError, match="audience"):
        IdentityVerifier("", certs.url)


async def test_client_fetches_the_token_from_the_metadata_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = Authority()
    seen: list[dict[str, str]] = []

    async def identity(request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor header")
        seen.append(dict(request.query))
        return web.Response(text=ca.token(request.query["audience"], "5150"))

    app = web.Application()
    app.router.add_get("/computeMetadata/v1/instance/service-accounts/default/identity", identity)
    runner = await serve(app)
    try:
        monkeypatch.setenv(
            "PREEMPTWATCH_GCP_METADATA_URL", f"http://127.0.0.1:{runner.addresses[0][1]}"
        )
        source = GCPIdentityToken(AUD)
        token = await source()
        assert await source() == token  # cached
    finally:
        await runner.cleanup()
    assert seen == [{"audience": AUD, "format": "full"}]
    path = tmp_path / "certs.json"
    path.write_text(json.dumps(ca.certs()))
    verifier = IdentityVerifier(AUD, str(path))
    assert (await verifier.verify(token)).instance_id == "5150"
