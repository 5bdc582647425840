"""One asyncio event loop in a daemon thread, kept for the life of the process.

An HTTP client's connection pool and an ``asyncio.Semaphore`` belong to the loop they
were made on. Running every batch's requests on one long-lived loop lets a worker keep
one client (one pool of keep-alive connections) and one in-flight budget across all of
its batches, and lets several threads (a threads pool's slots, a pipelined batch) hand
it work at once instead of each spinning up a loop of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """Starts its loop on first use; a forked child starts a fresh one (threads do not survive fork)."""

    def __init__(self, name: str = "ragq-llm-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; cancelling the future cancels the coroutine."""
        loop = self._running_loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.submit() called from its own loop; await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """``coro``'s result, waited for in this thread; an interrupt here cancels it there."""
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:  # a soft time limit or KeyboardInterrupt: stop the work too
            future.cancel()
            raise

    @property
    def started(self) -> bool:
        return self._loop is not None and self._pid == os.getpid()

    def close(self, cleanup: Coroutine[Any, Any, Any] | None = None, timeout: float = 10.0) -> None:
        """Run ``cleanup`` (closing clients) on the loop, then stop it and join the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            ours = self._pid == os.getpid()
            self._loop = self._thread = self._pid = None
        if loop is None or not ours or thread is None:
            if cleanup is not None:
                cleanup.close()
            return
        if cleanup is not None:
            try:
                asyncio.run_coroutine_threadsafe(cleanup, loop).result(timeout)
            except Exception:  # closing is best effort: the process is going anyway
                pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def serve() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=serve, name=self.name, daemon=True)
                thread.start()
                ready.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop
