"""
Counting the attempts of known keys without a trip to the database per
connection: both stores count them in memory and write them in one batch.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

#: Seconds an attempt may wait in memory before it is written.
SEEN_INTERVAL = 1.0

#: A batch to write: attempts, last seen (POSIX seconds), last source and
#: fingerprint, one row per key, in fingerprint order.
Rows = list[tuple[int, float, str, str]]


class AttemptCounter:
    """
    Counts attempts (C{count}) and has them written (C{write}, given the rows
    of one batch) at most L{SEEN_INTERVAL} seconds later, or at once with
    C{flush}.  Each C{count}'s L{Deferred} fires when its batch is written,
    or fails as the write did.
    """

    def __init__(
        self,
        clock: IReactorTime,
        now: Callable[[], float],
        write: Callable[[Rows], Deferred[None]],
    ) -> None:
        self._clock = clock
        self._now = now
        self._write = write
        self._counted: dict[str, tuple[int, float, str]] = {}
        self._waiting: list[Deferred[None]] = []
        self._call: IDelayedCall | None = None

    def count(self, fingerprint: str, source: str) -> Deferred[None]:
        """
        One more attempt with C{fingerprint}'s key, from C{source}, now.
        """
        n = self._counted.get(fingerprint, (0, 0.0, ""))[0]
        self._counted[fingerprint] = (n + 1, self._now(), source)
        written: Deferred[None] = Deferred()
        self._waiting.append(written)
        if self._call is None:
            self._call = self._clock.callLater(SEEN_INTERVAL, self.flush)
        return written

    def flush(self) -> Deferred[None]:
        """
        Write what is counted now; fires once it is written.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        counted, self._counted = self._counted, {}
        waiting, self._waiting = self._waiting, []
        if not counted:
            return succeed(None)
        rows = [
            (n, when, source, fingerprint)
            for fingerprint, (n, when, source) in sorted(counted.items())
        ]

        def done(result: object) -> None:
            for written in waiting:
                if isinstance(result, Failure):
                    written.errback(result)
                else:
                    written.callback(None)

        return self._write(rows).addBoth(done)
