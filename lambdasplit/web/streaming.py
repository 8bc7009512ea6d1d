"""Run a blocking generation in its own thread and stream its events to an HTTP client.

The generation must not block the server's event loop, and it must stop when the client goes away:
the generation checks `cancel` between round trips, and the consumer sets it when the response ends
for any reason (done, client disconnected, server shutting down).

A generation either yields its events (`start`) or reports them through a callback (`start_emitting`,
for work such as ImageClient.generate that calls back once per step).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from ..util.threads import take_over

_END = object()

Emit = Callable[[object], None]


class Failed:
    """The producer raised: the error, passed to the consumer in the event stream's place."""

    def __init__(self, error: BaseException):
        self.error = error


def start(produce: Callable[[], Iterator], cancel: threading.Event) -> "Events":
    """Start `produce()` in a daemon thread; iterate the returned object (async) for its events."""

    def run(emit: Emit) -> None:
        events = produce()
        try:
            for event in events:  # the generation itself watches `cancel` and ends with its own event
                emit(event)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    return start_emitting(run, cancel)


def start_emitting(run: Callable[[Emit], None], cancel: threading.Event) -> "Events":
    """Start `run(emit)` in a daemon thread; every `emit(event)` reaches the returned object's iterators."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down
            cancel.set()

    def work() -> None:
        take_over()  # the threads `lambdasplit web` handed over before loading the model (util/threads.py)
        try:
            run(put)
        except Exception as exc:  # reported to the client, which decides how to show it
            put(Failed(exc))
        finally:
            put(_END)

    threading.Thread(target=work, name="lambdasplit-generation", daemon=True).start()
    return Events(queue, cancel)


class Events:
    def __init__(self, queue: asyncio.Queue, cancel: threading.Event):
        self.queue, self.cancel = queue, cancel

    async def first(self):
        """The first event (or Failed, or None when there was none), to answer errors before streaming."""
        item = await self.queue.get()
        return None if item is _END else item

    async def rest(self) -> AsyncIterator:
        """Every later event, until the producer ends; cancels the producer if the consumer stops early."""
        try:
            while (item := await self.queue.get()) is not _END:
                yield item
        finally:
            self.cancel.set()

    def stop(self) -> None:
        self.cancel.set()
