"""Checkpoint bytes: a local directory (default) or S3. Bytes are stored under opaque keys;
names, sizes and hashes live in the database, so a half-written upload never shows."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import ConfigError, NotFound
from ..extras import import_extra

CHUNK = 256 * 1024
#: Uploads to S3 are spooled in memory up to this size, then on disk.
SPOOL_MAX = 8 * 1024 * 1024


class Storage(Protocol):
    """Where file bytes go."""

    async def save(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        """Store the bytes under ``key``; on an error nothing is left behind."""

    def open(self, key: str) -> AsyncIterator[bytes]:
        """The bytes under ``key``, in chunks; raises `NotFound` when absent."""

    async def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are ignored."""


def new_key(project_id: int, run_id: str) -> str:
    """A fresh key for one upload of a file of a run."""
    return f"{project_id}/{run_id}/{uuid.uuid4().hex}"


def open_storage(url: str) -> Storage:
    """``s3://bucket/prefix`` or a local directory (a path or ``file://`` URL)."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"--storage {url!r}: name a bucket, as in s3://bucket/prefix")
        return S3Storage(bucket, prefix.strip("/"))
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        raise ConfigError(f"--storage {url!r}: use a directory or s3://bucket/prefix")
    return LocalStorage(Path(url))


class LocalStorage:
    """Files in a directory: written to ``.part`` then renamed, so readers never see half."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    async def save(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        path = self._path(key)
        part = path.with_name(path.name + ".part")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        fh = await asyncio.to_thread(open, part, "wb")
        try:
            async for chunk in chunks:
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_flush_close, fh)
            await asyncio.to_thread(os.replace, part, path)
        except BaseException:
            fh.close()
            with contextlib.suppress(OSError):
                part.unlink()
            raise

    async def open(self, key: str) -> AsyncIterator[bytes]:
        try:
            fh = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            raise NotFound("the file's bytes are missing from storage") from None
        try:
            while chunk := await asyncio.to_thread(fh.read, CHUNK):
                yield chunk
        finally:
            fh.close()

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(key).unlink)


def _flush_close(fh: IO[bytes]) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


class S3Storage:
    """Objects in an S3 bucket, through boto3 in worker threads. Uploads are spooled to a
    temporary file (memory up to 8 MiB) and sent with boto3's managed (multipart)
    transfer; downloads stream the object body. Honours ``AWS_ENDPOINT_URL``."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        boto3 = import_extra("boto3", "aws", "S3 checkpoint storage")
        self.bucket = bucket
        self.prefix = prefix
        self.client: Any = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def save(self, key: str, chunks: AsyncIterator[bytes]) -> None:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX) as spool:
            written = 0
            async for chunk in chunks:
                written += len(chunk)
                if written > SPOOL_MAX:  # on disk by now: write off the event loop
                    await asyncio.to_thread(spool.write, chunk)
                else:
                    spool.write(chunk)
            spool.seek(0)
            await asyncio.to_thread(self.client.upload_fileobj, spool, self.bucket, self._key(key))

    async def open(self, key: str) -> AsyncIterator[bytes]:
        client = self.client
        try:
            obj = await asyncio.to_thread(client.get_object, Bucket=self.bucket, Key=self._key(key))
        except client.exceptions.NoSuchKey:
            raise NotFound("the file's bytes are missing from storage") from None
        body = obj["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                yield chunk
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))
