"""Freeing a client's engine requests as soon as it goes away.

Streamed answers: `GenerationStreamResponse` aborts its requests however the response ends (finished,
failed, or cancelled by Starlette when the client disconnects), even if the body was never iterated.
Whole answers: `until_disconnected` races the work against the client's disconnect and cancels the work,
whose own cleanup aborts its requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lora_serving.handler.generation_runner import RunningPrompt, abort_all

T = TypeVar("T")

# nginx's status for "the client went away before the answer": never seen by that client, but counted.
CLIENT_CLOSED_REQUEST = 499


class GenerationStreamResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], running: list[RunningPrompt], media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self._running = running

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            abort_all(self._running)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
    """(True, result) if `work` finished first; (False, None) if the client disconnected first, in which
    case `work` has been cancelled."""
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
    if work_task.done():
        return True, work_task.result()
    work_task.cancel()
    await asyncio.gather(work_task, return_exceptions=True)
    return False, None


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
