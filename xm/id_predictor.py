"""Predicts the ids a backend will assign, so they are known before creation.

A launcher often needs a work unit's id before the unit exists (to put it in a
checkpoint path, say). Assuming the backend numbers objects sequentially and
only this process creates them, ids can be reserved client-side:

    predictor = Predictor(next_id=1)
    wid = predictor.reserve_id()          # synchronous, thread-safe
    ...
    async with predictor.submit_id(wid):  # waits until wid - 1 was created
        submit_to_backend(...)

If a submission fails the sequence is broken: every later `submit_id` raises
`BrokenSequenceError` instead of creating objects with the wrong ids.
"""

from __future__ import annotations

import contextlib
import threading

TYPE_CHECKING = False  # typing is not imported at run time: it is slow to import
if TYPE_CHECKING:
    from typing import Any, AsyncIterator, Optional


class BrokenSequenceError(RuntimeError):
    """The id can never be submitted because an earlier submission failed."""


class Predictor:
    """Hands out ids in order and serialises their submission.

    `reserve_id` may be called from any thread; `submit_id` must be used from
    one asyncio event loop (the experiment's).
    """

    def __init__(self, next_id: int) -> None:
        self._next_id = next_id
        # A threading lock: reserve_id is called outside the event loop too.
        self._next_id_lock = threading.Lock()
        self._is_broken = False
        self._last_created_id = next_id - 1
        # Created on first use, inside the loop that will wait on it.
        self._condition: Optional[Any] = None

    def reserve_id(self) -> int:
        """Returns the next id; ids are handed out in call order."""
        with self._next_id_lock:
            next_id = self._next_id
            self._next_id += 1
            return next_id

    def _get_condition(self) -> Any:
        if self._condition is None:
            import asyncio

            self._condition = asyncio.Condition()
        return self._condition

    @contextlib.asynccontextmanager
    async def submit_id(self, id_to_submit: int) -> AsyncIterator[None]:
        """Waits until all smaller ids were submitted; marks this one on exit.

        Raises:
          BrokenSequenceError: an earlier submission failed.
        """
        condition = self._get_condition()
        async with condition:
            await condition.wait_for(
                lambda: self._is_broken or self._last_created_id == id_to_submit - 1
            )
            try:
                if self._is_broken:
                    raise BrokenSequenceError(
                        f"Id {id_to_submit} would never be ready to submit as "
                        "submission of the previous one has failed"
                    )
                yield
                self._last_created_id = id_to_submit
            except BaseException:
                self._is_broken = True
                raise
            finally:
                condition.notify_all()
