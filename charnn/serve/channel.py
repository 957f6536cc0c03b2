"""A stream's channel between the batch and its HTTP response: text waits
here until the client takes it, within a bounded buffer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

OVERFLOW = ("this stream was dropped: its client stopped reading while the text piled up on the server; "
            "read the stream as it arrives")
# Seconds a send to the client must have been waiting before a full buffer
# counts as a client that stopped reading. A small fast model makes more text
# between two sends than the buffer holds, for a client that reads all of it.
STALLED_SEND = 0.5

class Channel:
    """Items from the worker thread to one request's coroutine. The worker
    wakes the event loop only when the coroutine is waiting, so a busy stream
    costs one wake-up per send, not one per character.

    ``keep``: the kinds worth keeping (a JSON reply needs only ``done`` or
    ``error``). ``limit``: how much text may wait for a client that does not
    read, in units of about 100 bytes: one per item and per piece, and
    ``weight`` per character (1 plus the alternatives sent with it). Past it,
    once the coroutine's send to the client has waited ``STALLED_SEND``
    seconds (``sending_since``, set by the coroutine), the channel ends the
    stream with an ``error`` item, drops the text waiting and what comes
    after, and calls ``on_overflow`` on the event loop, so the request can be
    cancelled and its place in the batch freed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_on: tuple[str, ...] = ("text", "done", "error"),
                 keep: tuple[str, ...] | None = None, limit: int | None = None, weight: int = 1):
        self.loop = loop
        self.wake_on = wake_on  # a JSON (not streamed) reply waits for "done" only
        self.keep = keep
        self.limit = limit
        self.weight = weight
        self.on_overflow: Any = None
        self.overflowed = False
        self.sending_since: float | None = None  # when the coroutine began its current send to the client
        self._pending = 0  # text units waiting for get_all
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        if self.keep is not None and item[0] not in self.keep:
            return
        overflow = False
        with self._lock:
            if item[0] == "text" and self.limit is not None:
                if self.overflowed:
                    return
                self._pending += 1 + sum(1 + self.weight * len(text) for text, _ in item[1].values())
                since = self.sending_since
                if self._pending > self.limit and since is not None and time.monotonic() - since > STALLED_SEND:
                    self.overflowed = overflow = True
                    self._items = deque(i for i in self._items if i[0] != "text")
                    item = ("error", (408, OVERFLOW))
            self._items.append(item)
            waiter = None
            if item[0] in self.wake_on:
                waiter, self._waiter = self._waiter, None
        if overflow and self.on_overflow is not None:
            self.loop.call_soon_threadsafe(self.on_overflow)
        if waiter is not None:
            self.loop.call_soon_threadsafe(_wake, waiter)

    async def get_all(self) -> list[Any]:
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    self._pending = 0
                    return items
                self._waiter = waiter = self.loop.create_future()
            await waiter


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
