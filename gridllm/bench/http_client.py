"""A small asyncio HTTP/1.1 client for ``bench serve --backend openai``: JSON POSTs whose
answers are read as server-sent events, over a pool of keep-alive connections.

Written on asyncio streams rather than a full client library so that the client's own cost
per streamed event stays small next to the server's, as the gRPC client's does.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from gridllm.common.auth import API_KEY_ENV


class HttpError(Exception):
    """A non-200 answer (``status``, and the body's text)."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to one server (``http://host:port``), on reused connections."""

    def __init__(self, base_url: str, api_key: str | None = None):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--target must be http://HOST:PORT for the openai backend, "
                             f"got {base_url!r}.")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._idle: list[_Connection] = []
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._auth_header = f"Authorization: Bearer {api_key}\r\n" if api_key else ""

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def _connection(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 22)
        return _Connection(reader, writer)

    async def get_json(self, path: str) -> Any:
        chunks = [c async for c in self._request("GET", path, None)]
        return json.loads(b"".join(chunks))

    async def stream_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """POST ``body`` as JSON; yields the ``data:`` payload of each event as it arrives."""
        pending = b""
        async for chunk in self._request("POST", path, json.dumps(body).encode()):
            pending += chunk
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        yield line[6:]

    async def _request(self, method: str, path: str, payload: bytes | None
                       ) -> AsyncIterator[bytes]:
        connection = await self._connection()
        is_reusable = False
        try:
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Accept: */*\r\n{self._auth_header}")
            if payload is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            connection.writer.write(head.encode() + b"\r\n" + (payload or b""))
            await connection.writer.drain()
            status, headers = await _read_head(connection.reader)
            body = _read_body(connection.reader, headers)
            if status != 200:
                text = b"".join([c async for c in body]).decode(errors="replace")
                raise HttpError(status, text)
            async for chunk in body:
                yield chunk
            is_reusable = headers.get("connection", "").lower() != "close"
        finally:
            if is_reusable:
                self._idle.append(connection)
            else:
                connection.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]
                     ) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        length = int(headers.get("content-length", "0"))
        if length:
            yield await reader.readexactly(length)
