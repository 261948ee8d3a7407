"""Admission: at most `--max-concurrent` generations run, at most `--max-queue` wait.

The gate sits in front of the engine so the HTTP layer knows, synchronously and
without races, whether a new request can wait or must get 429 now (with a
`Retry-After` a client can honour), and so it can measure queue time and the
waiting count the metrics report. Cancellation (client gone, timeout) while
waiting leaves the queue; while running it frees the slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from modeldeploy.server.http.errors import ApiError


class QueueFullError(ApiError):
    """429: every slot is busy and `--max-queue` requests already wait."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(
            429,
            f"server is at capacity: {waiting} requests already wait for a slot; retry later",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        )


class AdmissionGate:
    """A FIFO semaphore with a bounded waiting line and a duration estimate for Retry-After."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.waiting = 0
        self._mean_duration_s = 1.0  # moving average of slot hold time

    @property
    def capacity(self) -> int:
        """Requests the server holds at once (running plus waiting)."""
        return self.max_concurrent + self.max_queue

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: queue length times mean hold time over slots."""
        estimate = self._mean_duration_s * (self.waiting + 1) / self.max_concurrent
        return max(1, min(60, math.ceil(estimate)))

    def check(self, count: int = 1) -> None:
        """Raise 429 unless `count` more requests fit in the free slots plus the queue."""
        if count > self.capacity - self.running - self.waiting:
            raise QueueFullError(self.waiting, self.retry_after())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one generation slot; yields the seconds spent waiting for it."""
        self.check()
        arrived = time.monotonic()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        admitted = time.monotonic()
        self.running += 1
        try:
            yield admitted - arrived
        finally:
            self.running -= 1
            self._slots.release()
            held = time.monotonic() - admitted
            self._mean_duration_s = 0.8 * self._mean_duration_s + 0.2 * held
