"""Batches packaging requests so that everything is built in one go.

`Experiment.package_async(p)` queues `p` and returns an awaitable;
`Experiment.package()` then builds the whole queue in a single call to the
backend's packaging router, which can share work between items (one archive,
one image build) instead of building them one by one.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from concurrent import futures
    from typing import Any, Awaitable, Callable, List, Sequence

    from xm import job_blocks


class PackageHasNotBeenCalledError(RuntimeError):
    """A `package_async()` result was awaited before `.package()` was called."""


class PicklableAwaitableImpl:
    """An awaitable over a future; pickles as its (already known) result."""

    def __init__(self, get_future: Callable[[], Any]) -> None:
        self._get_future = get_future

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self._get_future()).__await__()

    def __reduce__(self) -> Any:
        return _return_awaited, (self._get_future().result(),)


def _return_awaited(awaited: Any) -> Awaitable[Any]:
    """Returns a picklable awaitable resolving to `awaited` (used by unpickling)."""

    def get_future() -> futures.Future:
        from concurrent import futures

        future: futures.Future = futures.Future()
        future.set_result(awaited)
        return future

    return PicklableAwaitableImpl(get_future)


class AsyncPackager:
    """Collects packageables and builds them in one batch.

    Thread-safe: `add` and `package` may be called from different threads.
    """

    def __init__(
        self,
        package_batch: Callable[
            [Sequence[job_blocks.Packageable]], Sequence[job_blocks.Executable]
        ],
    ) -> None:
        """`package_batch` builds a sequence of packageables, results in order."""
        self._lock = threading.Lock()
        self._package_batch = package_batch
        self._packageables: List[job_blocks.Packageable] = []
        self._futures: List[futures.Future] = []

    def add(self, packageable: job_blocks.Packageable) -> Awaitable[job_blocks.Executable]:
        """Queues `packageable`; the result is available after `package()`."""
        from concurrent import futures

        future: futures.Future = futures.Future()
        with self._lock:
            self._packageables.append(packageable)
            self._futures.append(future)

        def get_future() -> futures.Future:
            with self._lock:
                queued = any(f is future for f in self._futures)
            if queued:
                raise PackageHasNotBeenCalledError(
                    ".package() must be called before awaiting on the packaging result"
                )
            return future

        return PicklableAwaitableImpl(get_future)

    def package(
        self, extra_packageables: Sequence[job_blocks.Packageable] = ()
    ) -> Sequence[job_blocks.Executable]:
        """Builds everything queued plus `extra_packageables` in one batch.

        Returns:
          The executables for `extra_packageables` only (same order); queued
          items get their results through their awaitables. If the build
          fails, every queued awaitable gets the exception, and it is raised.
        """
        with self._lock:
            packageables = self._packageables + list(extra_packageables)
            queued_futures = self._futures
            self._packageables = []
            self._futures = []

        if not packageables:
            return []

        try:
            executables = self._package_batch(packageables)
        except Exception as e:
            for future in queued_futures:
                future.set_exception(e)
            raise
        for executable, future in zip(executables, queued_futures):
            future.set_result(executable)
        return executables[len(queued_futures) :]
