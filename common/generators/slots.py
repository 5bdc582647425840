"""The in-flight budget of a worker's LLM requests, oldest batch first.

A plain ``asyncio.Semaphore`` hands a freed slot to whoever asked first. When two
batches share the budget (a threads pool's slots), the second batch's requests queue
while the first batch's first round is in flight, so the first batch's second round
waits behind them: both batches end together, both slots fetch their next batch at
the same moment, and the endpoint idles while both retrieve. Handing each freed slot
to the request with the lowest ``order`` (the time its batch began) lets the older
batch finish first, so one batch is always retrieving while the other's requests fly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySlots:
    """``capacity`` slots; a freed one goes to the waiter with the lowest order, then FIFO.

    Made and used on one event loop (not thread-safe, as ``asyncio.Semaphore``).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (cancelled ones not yet dropped included)."""
        return len(self._waiters)

    async def acquire(self, order: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (order, next(self._arrivals), waiter))
        self._grant()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as it was cancelled: give it back
                self.release()
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._grant()

    @asynccontextmanager
    async def hold(self, order: float) -> AsyncIterator[None]:
        await self.acquire(order)
        try:
            yield
        finally:
            self.release()

    def _grant(self) -> None:
        while self._waiters and self.in_use < self.capacity:
            _, _, waiter = heapq.heappop(self._waiters)
            if waiter.done():  # its request was cancelled while it waited
                continue
            waiter.set_result(None)
            self.in_use += 1
