"""Checkpoint files on local storage and on S3 (moto's server): streamed upload and
download, size limits, safe names, fencing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import boto3
import pytest
from moto.server import ThreadedMotoServer
from tests.conftest import free_port

from preemptwatch.server.testing import InProcessServer, ManualClock

from .conftest import Api

LIMIT = 1_000_000


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "local":
        return str(tmp_path / "files")
    moto_url = request.getfixturevalue("moto_url")
    for name, value in {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"ckpt-{os.urandom(4).hex()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


@pytest.fixture
async def files_api(
    db_url: str, storage_url: str, clock: ManualClock
) -> AsyncIterator[tuple[Api, str]]:
    async with (
        InProcessServer(db_url, storage_url, clock=clock, max_file_size=LIMIT) as server,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, server.url, server.api_key)
        await api.create("r1")
        yield api, storage_url


def _stored_objects(storage_url: str) -> list[str]:
    if storage_url.startswith("s3://"):
        bucket = storage_url[5:].split("/", 1)[0]
        listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
        return [o["Key"] for o in listing.get("Contents", [])]
    root = Path(storage_url)
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes([sent % 251]) * n
        sent += n


async def test_upload_list_download_replace(files_api: tuple[Api, str]) -> None:
    api, storage_url = files_api
    data = os.urandom(300_000)
    status, body = await api.request(
        "PUT", "/api/v1/runs/r1/files/ckpt/model.pt?incarnation=1", data=data
    )
    assert status == 200
    assert body == {
        "name": "ckpt/model.pt",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    status, listing = await api.get("/api/v1/runs/r1/files")
    assert status == 200 and [(f["name"], f["size"]) for f in listing["files"]] == [
        ("ckpt/model.pt", len(data))
    ]
    status, got = await api.get("/api/v1/runs/r1/files/ckpt/model.pt")
    assert status == 200 and got == data
    # replacing keeps one object
    new = b"second version"
    await api.request("PUT", "/api/v1/runs/r1/files/ckpt/model.pt?incarnation=1", data=new)
    assert (await api.get("/api/v1/runs/r1/files/ckpt/model.pt"))[1] == new
    assert len(_stored_objects(storage_url)) == 1


async def test_streamed_upload_without_length(files_api: tuple[Api, str]) -> None:
    api, _ = files_api
    status, body = await api.request(
        "PUT", "/api/v1/runs/r1/files/big.bin?incarnation=1", data=_chunks(LIMIT)
    )
    assert status == 200 and body["size"] == LIMIT
    expected = hashlib.sha256()
    async for chunk in _chunks(LIMIT):
        expected.update(chunk)
    assert body["sha256"] == expected.hexdigest()
    status, got = await api.get("/api/v1/runs/r1/files/big.bin")
    assert hashlib.sha256(got).hexdigest() == expected.hexdigest()


async def test_over_the_limit_is_413_and_nothing_is_kept(files_api: tuple[Api, str]) -> None:
    api, storage_url = files_api
    # declared length over the limit: refused before reading
    status, body = await api.request(
        "PUT", "/api/v1/runs/r1/files/big?incarnation=1", data=b"x" * (LIMIT + 1)
    )
    assert status == 413 and body["error"] == "too_large"
    # no length: counted while streaming
    status, body = await api.request(
        "PUT", "/api/v1/runs/r1/files/big?incarnation=1", data=_chunks(LIMIT + 10)
    )
    assert status == 413 and body["error"] == "too_large"
    assert (await api.get("/api/v1/runs/r1/files"))[1]["files"] == []
    assert (await api.get("/api/v1/runs/r1/files/big"))[0] == 404
    assert [k for k in _stored_objects(storage_url) if not k.endswith(".part")] == []


UNSAFE = ["..%2Fescape", "a%2F..%2F..%2Fx", "%2Fetc%2Fpasswd", "a%00b", "bad%5Cname", "sp%20ace"]


async def test_unsafe_names_are_refused(files_api: tuple[Api, str]) -> None:
    api, storage_url = files_api
    for name in UNSAFE:
        status, body = await api.request(
            "PUT", f"/api/v1/runs/r1/files/{name}?incarnation=1", data=b"x"
        )
        assert status == 400 and body["field"] == "name", body
        assert (await api.get(f"/api/v1/runs/r1/files/{name}"))[0] == 400
    assert _stored_objects(storage_url) == []


async def test_missing_file_run_or_incarnation(files_api: tuple[Api, str]) -> None:
    api, _ = files_api
    assert (await api.get("/api/v1/runs/r1/files/absent"))[0] == 404
    assert (await api.get("/api/v1/runs/nope/files"))[0] == 404
    status, _ = await api.request("PUT", "/api/v1/runs/nope/files/a?incarnation=1", data=b"x")
    assert status == 404
    status, body = await api.request("PUT", "/api/v1/runs/r1/files/a", data=b"x")
    assert status == 400 and body["field"] == "incarnation"
    status, body = await api.request("PUT", "/api/v1/runs/r1/files/a?incarnation=x", data=b"x")
    assert status == 400 and body["field"] == "incarnation"


async def test_files_survive_a_resume(files_api: tuple[Api, str]) -> None:
    api, _ = files_api
    await api.request("PUT", "/api/v1/runs/r1/files/ckpt?incarnation=1", data=b"step 5")
    await api.post("/api/v1/runs/r1/preempting", {"incarnation": 1})
    await api.create("r1", resume="must")
    assert (await api.get("/api/v1/runs/r1/files/ckpt"))[1] == b"step 5"
    status, _ = await api.request("PUT", "/api/v1/runs/r1/files/ckpt?incarnation=1", data=b"old")
    assert status == 409
    assert (await api.get("/api/v1/runs/r1/files/ckpt"))[1] == b"step 5"


async def test_large_s3_upload_goes_multipart_from_a_spool_on_disk(
    db_url: str, moto_url: str, monkeypatch: pytest.MonkeyPatch, clock: ManualClock
) -> None:
    from preemptwatch.server.storage import SPOOL_MAX

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"big-{os.urandom(4).hex()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    size = SPOOL_MAX + 3 * 1024 * 1024
    async with (
        InProcessServer(db_url, f"s3://{bucket}", clock=clock, max_file_size=size) as server,
        aiohttp.ClientSession() as session,
    ):
        api = Api(session, server.url, server.api_key)
        await api.create("r1")
        status, body = await api.request(
            "PUT", "/api/v1/runs/r1/files/model.pt?incarnation=1", data=_chunks(size, 1 << 20)
        )
        assert status == 200 and body["size"] == size
        async with session.get(
            f"{server.url}/api/v1/runs/r1/files/model.pt", headers=server.headers()
        ) as resp:
            assert resp.headers["Content-Length"] == str(size)
            digest = hashlib.sha256()
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == body["sha256"] == resp.headers["X-Checksum-Sha256"]
    [key] = _stored_objects(f"s3://{bucket}")
    head = boto3.client("s3").head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == size and "-" in head["ETag"]  # a multipart upload's ETag
