"""
A read cache for the SQLite store's hot path: the records of decided keys
and the client's pins, so that a known peer's handshake needs no trip to the
database thread.

It is kept exact for this store's own writes, and close to exact for
other processes writing the same file: every L{CHECK_INTERVAL} seconds,
while anything is cached, one query asks SQLite whether another connection
committed (C{PRAGMA data_version}), and if one did, everything is dropped.
A read that was under way while anything changed is not kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between checks for commits by other processes.
CHECK_INTERVAL = 0.25
#: The most entries kept of each kind.
MAX_ENTRIES = 100_000

_V = TypeVar("_V")


class _Entries(Generic[_V]):
    def __init__(self) -> None:
        self.values: dict[str, _V] = {}

    def keep(self, key: str, value: _V) -> None:
        if len(self.values) >= MAX_ENTRIES:
            self.values.clear()
        self.values[key] = value


class ReadCache:
    """
    @ivar records: decided records, by fingerprint.
    @ivar pins: pins, by address.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        dataVersion: Callable[[], Deferred[int]],
    ) -> None:
        """
        @param dataVersion: runs C{PRAGMA data_version} on the store's
            connection.
        """
        self.records: _Entries[Any] = _Entries()
        self.pins: _Entries[Any] = _Entries()
        self._clock = clock
        self._dataVersion = dataVersion
        self._version: int | None = None
        self._generation = 0
        self._checking: LoopingCall | None = None

    @property
    def generation(self) -> int:
        """
        Changes whenever anything may have changed; a read keeps its result
        only if it is the same when the read ends as when it began.
        """
        return self._generation

    def changed(self, record: str | None = None, pin: str | None = None) -> None:
        """
        This store is writing: drop what the write may change.
        """
        self._generation += 1
        if record is not None:
            self.records.values.pop(record, None)
        if pin is not None:
            self.pins.values.pop(pin, None)

    def mayKeep(self, generation: int) -> bool:
        """
        Whether a read that began at C{generation} may be kept; starts the
        checks for other writers if they are not running.
        """
        if self._checking is None:
            self._checking = LoopingCall(self._check)
            self._checking.clock = self._clock
            self._checking.start(CHECK_INTERVAL, now=True).addErrback(
                lambda f: self.log.failure("dwtrust: the store cache checks", f)
            )
        return self._version is not None and generation == self._generation

    def _check(self) -> Deferred[None]:
        def compare(version: int) -> None:
            if version != self._version:
                # Another process committed (or this is the first check):
                # nothing cached can be trusted to be current.
                self._version = version
                self._drop()

        def failed(failure: Any) -> None:
            self._version = None
            self._drop()
            if self._checking is None:
                return  # closing
            self.log.warn(
                "dwtrust: cannot check the trust store for other writers: {error}",
                error=failure.getErrorMessage(),
            )

        return self._dataVersion().addCallbacks(compare, failed)

    def _drop(self) -> None:
        self._generation += 1
        self.records.values.clear()
        self.pins.values.clear()

    def stop(self) -> None:
        checking, self._checking = self._checking, None
        if checking is not None and checking.running:
            checking.stop()
        self._drop()
