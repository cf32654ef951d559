"""Bounded request bodies: every upload path of the console is checked while it streams.

`BodyLimit` is a plain ASGI middleware around the whole console. A request whose Content-Length
announces more than `http.max_upload_mb` is refused with 413 before a byte of its body is read;
a body without Content-Length (chunked) is counted as the application reads it, and the read
that passes the limit raises `BodyTooLarge` (a 413 HTTPException, so FastAPI's form parsing
passes it on instead of calling it a parse error). Either way the answer says the limit and
closes the connection (`Connection: close`); a refused body whose announced length is at most
LINGER_BYTES is read and dropped first, so that the close does not reset the answer away.

What gets in is parsed by Starlette's streaming multipart parser (python-multipart): files are
spooled to temporary files, and the routes read one file at a time, so a request costs at most
one file's size in memory. The number of files per request is bounded by the routes' form
limits (`MAX_UPLOAD_FILES`); a file is never larger than the body limit.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable, Iterator

from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.console.actions import MAX_UPLOAD_FILES

MB = 1024 * 1024
# Form limits of the upload routes (FastAPI's form parser enforces them as it streams): files per
# request, other fields, and the size of a field that is not a file.
FORM_LIMITS = {"max_files": MAX_UPLOAD_FILES, "max_fields": 16, "max_part_size": 64 * 1024}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, setting: str = "http.max_upload_mb"):
        super().__init__(413, f"request body too large: this console takes at most {limit / MB:g} MB per request "
                              f"({setting}) here; send fewer or smaller files",
                         headers={"Connection": "close"})
        self.limit = limit


class BodyLimit:
    """`limit(path)`: the largest body in bytes for a request to `path` and the setting that says
    so (read per request, from the configuration in force);
    `refuse(request, exc)`: the 413 response (JSON for the API, a page for the pages)."""

    def __init__(self, app: ASGIApp, limit: Callable[[str], tuple[int, str]],
                 refuse: Callable[[Request, BodyTooLarge], Awaitable[Response]]):
        self.app = app
        self.limit = limit
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit(scope.get("path", ""))
        announced = _content_length(scope)
        if announced is not None and announced > limit:
            # small enough to read, and not held back for a 100 Continue (reading would invite it)
            if announced <= LINGER_BYTES and not _expects_continue(scope):
                await _discard_body(receive, announced)
            await self._answer(scope, receive, send, BodyTooLarge(limit, setting))
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # (no drain: a body without a length may be endless)
                    raise BodyTooLarge(limit, setting)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # normally answered by the app's handler; this is the fallback
            if started:
                raise
            await self._answer(scope, receive, send, exc)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, exc: BodyTooLarge) -> None:
        response = await self.refuse(Request(scope, receive), exc)
        await response(scope, receive, send)


# The server closes the connection after a 413. Closing a socket that still holds unread
# request bytes makes the kernel send a reset, which can destroy the 413 before the client
# reads it (RFC 9112 9.6 asks servers to close gracefully). So up to this much of a refused
# body is read and dropped first, within LINGER_S; past that, the reset is the lesser harm.
LINGER_BYTES = 128 * MB
LINGER_S = 5.0


async def _discard_body(receive: Receive, at_most: int) -> None:
    """Read and drop the rest of a refused request body (bounded in bytes and time)."""
    drained = 0
    deadline = asyncio.get_running_loop().time() + LINGER_S
    while drained < at_most:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _expects_continue(scope: Scope) -> bool:
    return Headers(scope=scope).get("expect", "").lower() == "100-continue"


def _content_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # h11 refuses a malformed Content-Length before the app sees it


def one_at_a_time(files: Iterable[UploadFile]) -> Iterator[tuple[str, bytes]]:
    """(file name, content) of each uploaded file, read from its spooled temporary file only when
    the consumer gets to it (in a worker thread: the reads block), so at most one is in memory."""
    for upload in files:
        upload.file.seek(0)
        yield upload.filename or "", upload.file.read()
