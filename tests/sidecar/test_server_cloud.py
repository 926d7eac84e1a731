"""The server's cloud integrations over real HTTP: GCP identity tokens as credentials
(certificates served locally), and EC2 events from moto's SQS marking runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web
from identity_helpers import Authority
from sidecar_helpers import Trigger, free_port

from preemptwatch.errors import ConfigError
from preemptwatch.notice import Notice
from preemptwatch.server.testing import InProcessServer
from preemptwatch.sidecar import GCPIdentityToken, Sidecar, SidecarConfig
from preemptwatch.simulate import serve

AUD = "https://pw.example.com"


def gcp_server(tmp_path: Path, certs: str) -> InProcessServer:
    """A server on SQLite that accepts GCE identity tokens for ``AUD`` signed by ``certs``."""
    return InProcessServer(
        f"sqlite:///{tmp_path / 'pw.db'}",
        str(tmp_path / "files"),
        gcp_identity_audience=AUD,
        gcp_identity_certs=certs,
    )


async def call(
    server: InProcessServer, method: str, path: str, token: str | None = None, **body: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token or server.api_key}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.request(method, f"{server.url}{path}", json=body or None, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def new_run(
    server: InProcessServer, run_id: str, instance: str, key: str | None = None
) -> None:
    status, body = await call(
        server, "POST", "/api/v1/runs", key, id=run_id, resume="never", instance_id=instance
    )
    assert status == 201, body


@pytest.fixture
async def cert_url() -> AsyncIterator[tuple[Authority, str]]:
    ca = Authority()
    app = web.Application()

    async def certs(request: web.Request) -> web.Response:
        return web.json_response(ca.certs())

    app.router.add_get("/certs", certs)
    runner = await serve(app)
    yield ca, f"http://127.0.0.1:{runner.addresses[0][1]}/certs"
    await runner.cleanup()


async def test_identity_tokens_authenticate_their_own_instance(
    tmp_path: Path, cert_url: tuple[Authority, str]
) -> None:
    ca, url = cert_url
    async with gcp_server(tmp_path, url) as server:
        await new_run(server, "train-a", "5150")
        await new_run(server, "train-b", "6666")
        good = ca.token(AUD, "5150")
        status, body = await call(server, "POST", "/api/v1/instances/5150/preempting", good)
        assert status == 200 and body == {"marked": ["train-a"]}
        refused = {
            "forged": Authority(kid=ca.kid).token(AUD, "5150"),
            "expired": ca.token(AUD, "5150", issued=time.time() - 7200, lifetime=3600),
            "audience": ca.token("https://other.example.com", "5150"),
        }
        for case, token in refused.items():
            status, body = await call(server, "POST", "/api/v1/instances/5150/preempting", token)
            assert status == 401 and body["error"] == "unauthorized", case
        status, body = await call(server, "POST", "/api/v1/instances/6666/preempting", good)
        assert status == 403
        # A run on this VM may be created with the token, for this instance only.
        status, body = await call(
            server, "POST", "/api/v1/runs", good, id="vm-run", resume="never", instance_id="5150"
        )
        assert status == 201 and body["instance_id"] == "5150" and body["project"] == "default"
        status, body = await call(
            server, "POST", "/api/v1/runs", good, id="vm-x", resume="never", instance_id="6666"
        )
        assert status == 403
        _, run_b = await call(server, "GET", "/api/v1/runs/train-b")
        assert run_b["preempting"] is False
        _, run_a = await call(server, "GET", "/api/v1/runs/train-a")
        assert run_a["preempting"] is True


async def test_bad_identity_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gcp-identity-certs"):
        gcp_server(tmp_path, str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="sqs-queue"):
        InProcessServer(
            f"sqlite:///{tmp_path / 'pw.db'}", str(tmp_path / "files"), sqs_queue="queue-name"
        )


@pytest.fixture
def sqs_queue(aws: str, request: Any) -> tuple[Any, str]:
    sqs = boto3.client("sqs")
    name = f"pw-{request.node.name}".replace("[", "-").replace("]", "")[:70]
    return sqs, sqs.create_queue(QueueName=name)["QueueUrl"]


async def test_sqs_events_mark_the_instance_in_every_project(
    db_url: str, tmp_path: Path, sqs_queue: tuple[Any, str]
) -> None:
    sqs, queue = sqs_queue
    async with InProcessServer(db_url, str(tmp_path / "files"), sqs_queue=queue) as server:
        other_key = await server.ctx.store.create_key("other")
        await new_run(server, "a", "i-0abc")
        await new_run(server, "b", "i-0abc", other_key)
        await new_run(server, "c", "i-0def")
        event = {
            "id": "e1",
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "time": "2026-11-23T17:00:00Z",
            "detail": {"instance-id": "i-0abc", "instance-action": "terminate"},
        }
        sqs.send_message(QueueUrl=queue, MessageBody="{broken")
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))
        for _ in range(200):
            _, a = await call(server, "GET", "/api/v1/runs/a")
            _, b = await call(server, "GET", "/api/v1/runs/b", other_key)
            if a["preempting"] and b["preempting"]:
                break
            await asyncio.sleep(0.05)
        _, c = await call(server, "GET", "/api/v1/runs/c")
    assert a["preempting"] and b["preempting"] and not c["preempting"]
    left = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert left["ApproximateNumberOfMessages"] == "0"
    assert left["ApproximateNumberOfMessagesNotVisible"] == "0"


async def test_unreachable_certificates_answer_503_and_api_keys_still_work(
    tmp_path: Path,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/certs"
    async with gcp_server(tmp_path, closed) as server:
        token = Authority().token(AUD, "5150")
        status, body = await call(server, "POST", "/api/v1/instances/5150/preempting", token)
        assert status == 503
        status, body = await call(server, "POST", "/api/v1/instances/5150/preempting")
        assert status == 200 and body == {"marked": []}
        status, body = await call(server, "GET", "/api/v1/runs", "not-a-key")
        assert status == 401


async def test_a_gce_sidecar_marks_its_runs_with_its_identity_token(
    tmp_path: Path, cert_url: tuple[Authority, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, url = cert_url

    async def identity(request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text=ca.token(request.query["audience"], "5150"))

    metadata = web.Application()
    metadata.router.add_get(
        "/computeMetadata/v1/instance/service-accounts/default/identity", identity
    )
    meta_runner = await serve(metadata)
    monkeypatch.setenv(
        "PREEMPTWATCH_GCP_METADATA_URL", f"http://127.0.0.1:{meta_runner.addresses[0][1]}"
    )
    trigger = Trigger()
    try:
        async with gcp_server(tmp_path, url) as server:
            await new_run(server, "on-vm", "5150")
            config = SidecarConfig(
                sources=[trigger],
                port=0,
                instance_id="5150",
                server=server.url,
                token=GCPIdentityToken(AUD),
                spool_dir=tmp_path / "spool",
            )
            async with Sidecar(config):
                await trigger.fire(Notice("gcp", "preempt", id="p1"))
                for _ in range(200):
                    _, run = await call(server, "GET", "/api/v1/runs/on-vm")
                    if run["preempting"]:
                        break
                    await asyncio.sleep(0.05)
        assert run["preempting"] is True
    finally:
        await meta_runner.cleanup()
