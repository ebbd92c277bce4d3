"""
What a stranger can make a listening side hold, and the limits on it.

Before a peer has proved a key the owners approved, everything it can make
the service hold has a bound: connections (per source and in total), TLS
handshakes in progress, connections waiting for a trust decision (per key),
application bytes held back until the decision (in total), and log lines
about the connections it abandons.

- L{Limits} is the configuration: one value per limit, with defaults that
  C{twistd dwtrust} and L{dwtrust.Authenticator} share.
- L{Admission} is the state: one per L{dwtrust.Authenticator}, shared by the
  server factories it wraps, consulted by L{dwtrust._protocol}.

A source is an address prefix (see L{sourcePrefix}), not an address: one
IPv6 /64 is a world of addresses, and so, to a cap that counts exact
addresses, is one IPv4 /24.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable

from attrs import define, field, frozen, validators
from twisted.internet.interfaces import IAddress

from .store._interface import hostPrefix

#: Bytes of a peer's certificate, at most.  A dwtrust certificate is made
#: in memory from the identity key: about 300 bytes for Ed25519, 400 to 500
#: for ECDSA and under 2.5 KiB even for RSA-4096.  8 KiB is three times the
#: largest, and a fiftieth of the 400 KiB a certificate could otherwise make
#: the key cache hold.
DEFAULT_MAX_CERTIFICATE = 8 * 1024
#: Connections not yet trusted, in total.  Under the usual limit of 1,024
#: descriptors, with room for approved clients (two descriptors each: theirs
#: and the forwarded one) and the control channel.
DEFAULT_MAX_UNTRUSTED = 512
#: Connections not yet trusted from one source (an IPv4 /24, an IPv6 /64).
DEFAULT_MAX_UNTRUSTED_PER_SOURCE = 64
#: Connections of one key waiting for a trust decision, for a key this
#: service has trusted before (whose decisions are store look-ups, quick).
DEFAULT_MAX_WAITING_PER_KEY = 64
#: The same, for a key it has never trusted (whose connections wait for the
#: owners): a client waiting for approval needs one, and a few retries.
DEFAULT_MAX_WAITING_PER_NEW_KEY = 4
#: Application bytes held back, over all the connections not yet trusted:
#: 64 connections holding all they may (256 KiB each).
DEFAULT_MAX_HELD_BYTES = 16 * 1024 * 1024
#: TLS handshakes in progress; connections past these wait, unread, for a
#: place (within the handshake time-out).  With 1,000 unknown clients at
#: once (benchmarks/storm.py), the reactor's largest stall was about 80 ms
#: with 8, 160 ms with 32, 310 ms with 128 and 875 ms without a cap.
DEFAULT_MAX_TLS_HANDSHAKES = 16
#: Seconds between two log lines about connections abandoned from one source.
DEFAULT_SCAN_LOG_INTERVAL = 60.0

#: Fingerprints remembered as trusted before, at most (the oldest forgotten).
MAX_REMEMBERED_KEYS = 65536
#: Sources whose log lines are being counted, at most.
MAX_LOGGED_SOURCES = 4096

_positive = validators.gt(0)


@frozen
class Limits:
    """
    The limits on what peers not yet trusted can make a listening side hold.

    @ivar maxCertificate: bytes of the peer's certificate, at most (larger
        ones are refused with C{protocol_error}).
    @ivar maxUntrusted: connections not yet trusted, in total.
    @ivar maxUntrustedPerSource: connections not yet trusted from one source
        (IPv4 /24, IPv6 /64).
    @ivar maxWaitingPerKey: connections of one key waiting for a decision,
        for a key trusted before.
    @ivar maxWaitingPerNewKey: the same for a key never trusted.
    @ivar maxHeldBytes: application bytes held back for connections not yet
        trusted, in total.
    @ivar maxTLSHandshakes: TLS handshakes in progress; more wait for a place.
    @ivar scanLogInterval: seconds between log lines about abandoned
        connections from one source.
    """

    maxCertificate: int = field(default=DEFAULT_MAX_CERTIFICATE, validator=_positive)
    maxUntrusted: int = field(default=DEFAULT_MAX_UNTRUSTED, validator=_positive)
    maxUntrustedPerSource: int = field(
        default=DEFAULT_MAX_UNTRUSTED_PER_SOURCE, validator=_positive
    )
    maxWaitingPerKey: int = field(
        default=DEFAULT_MAX_WAITING_PER_KEY, validator=_positive
    )
    maxWaitingPerNewKey: int = field(
        default=DEFAULT_MAX_WAITING_PER_NEW_KEY, validator=_positive
    )
    maxHeldBytes: int = field(default=DEFAULT_MAX_HELD_BYTES, validator=_positive)
    maxTLSHandshakes: int = field(
        default=DEFAULT_MAX_TLS_HANDSHAKES, validator=_positive
    )
    scanLogInterval: float = field(
        default=DEFAULT_SCAN_LOG_INTERVAL, validator=validators.ge(0)
    )


def sourcePrefix(address: IAddress) -> str:
    """
    The source a connection is counted under: its IPv4 /24 or IPv6 /64 (an
    IPv4-mapped IPv6 address counts as IPv4; see
    L{dwtrust.store.sourceHost}, the same rule for the pending caps),
    C{"unix"} for a UNIX socket, or the address's text for anything else.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return "unix" if hasattr(address, "name") else repr(address)
    return hostPrefix(host)


@define
class RateLimitedLog:
    """
    Says whether a log line about a source may be written now: at most one
    per source per C{interval} seconds, with the number of lines held back
    since the last one.  Remembers at most L{MAX_LOGGED_SOURCES} sources.
    """

    interval: float
    now: Callable[[], float]
    _sources: OrderedDict[str, tuple[float, int]] = field(
        init=False, factory=OrderedDict
    )

    def allow(self, source: str) -> int | None:
        """
        Count one line about C{source}.

        @return: L{None} if it is to be held back; otherwise the number of
            lines about C{source} held back before it.
        """
        now = self.now()
        last = self._sources.get(source)
        if last is not None and now - last[0] < self.interval:
            self._sources[source] = (last[0], last[1] + 1)
            return None
        self._sources.pop(source, None)
        self._sources[source] = (now, 0)
        while len(self._sources) > MAX_LOGGED_SOURCES:
            self._sources.popitem(last=False)
        return 0 if last is None else last[1]


class Refused(Exception):
    """
    A limit was reached.  C{str()} says which, for the peer and the log.
    """


@define
class Admission:
    """
    The counts that L{Limits} bound, for the server side of an
    L{dwtrust.Authenticator}.

    Each C{take...} either counts one more or raises L{Refused}; each is
    paired with a C{release...} that the caller makes exactly once.
    """

    limits: Limits
    now: Callable[[], float]
    untrusted: int = 0
    _perSource: dict[str, int] = field(init=False, factory=dict)
    handshaking: int = 0
    _queue: deque[Callable[[], None]] = field(init=False, factory=deque)
    _knownQueue: deque[Callable[[], None]] = field(init=False, factory=deque)
    _waiting: dict[str, int] = field(init=False, factory=dict)
    heldBytes: int = 0
    _trustedBefore: OrderedDict[str, None] = field(init=False, factory=OrderedDict)
    _trustedSources: OrderedDict[str, None] = field(init=False, factory=OrderedDict)
    scanLog: RateLimitedLog = field(init=False)
    refusalLog: RateLimitedLog = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.scanLog = RateLimitedLog(self.limits.scanLogInterval, self.now)
        self.refusalLog = RateLimitedLog(self.limits.scanLogInterval, self.now)

    # Connections not yet trusted

    def takeUntrusted(self, source: str) -> None:
        """
        Count a new connection from C{source}, or refuse it.

        A source some peer was trusted from has room kept for it past the
        total: as much again as one source may hold.
        """
        total = self.limits.maxUntrusted
        if source in self._trustedSources:
            total += self.limits.maxUntrustedPerSource
        if self.untrusted >= total:
            raise Refused(
                f"{self.untrusted} connections not yet trusted, the most this"
                " service holds"
            )
        count = self._perSource.get(source, 0)
        if count >= self.limits.maxUntrustedPerSource:
            raise Refused(
                f"{count} connections not yet trusted from {source}, the most"
                " this service holds from one source"
            )
        self.untrusted += 1
        self._perSource[source] = count + 1

    def releaseUntrusted(self, source: str) -> None:
        self.untrusted -= 1
        count = self._perSource[source] - 1
        if count:
            self._perSource[source] = count
        else:
            del self._perSource[source]

    # TLS handshakes in progress

    def takeHandshake(self, start: Callable[[], None], source: str = "") -> bool:
        """
        Take a place for a TLS handshake if there is one (and return
        L{True}); otherwise queue C{start}, to be called when one is given
        to it, and return L{False}.  Connections from a source some peer
        was trusted from are given places before the others.
        """
        if self.handshaking < self.limits.maxTLSHandshakes:
            self.handshaking += 1
            return True
        if source in self._trustedSources:
            self._knownQueue.append(start)
        else:
            self._queue.append(start)
        return False

    def releaseHandshake(self) -> None:
        """
        A handshake is over: give its place to the one that has waited the
        longest.  (First in, first out: the queue is no longer than the
        connections not yet trusted, so none waits longer than it takes to
        run that many handshakes.)
        """
        self.handshaking -= 1
        queue = self._knownQueue or self._queue
        if queue and self.handshaking < self.limits.maxTLSHandshakes:
            self.handshaking += 1
            queue.popleft()()

    def withdraw(self, start: Callable[[], None]) -> None:
        """
        A queued connection went away before it got a place.
        """
        for queue in (self._knownQueue, self._queue):
            with contextlib.suppress(ValueError):
                queue.remove(start)
                return

    @property
    def queued(self) -> int:
        return len(self._knownQueue) + len(self._queue)

    # Connections waiting for a trust decision

    def trustedBefore(self, fingerprint: str) -> bool:
        return fingerprint in self._trustedBefore

    def rememberTrusted(self, fingerprint: str, source: str) -> None:
        """
        A connection of C{fingerprint} from C{source} is trusted.
        """
        _remember(self._trustedBefore, fingerprint, MAX_REMEMBERED_KEYS)
        _remember(self._trustedSources, source, MAX_LOGGED_SOURCES)

    def forgetTrusted(self, fingerprint: str) -> None:
        self._trustedBefore.pop(fingerprint, None)

    def takeWaiting(self, fingerprint: str) -> None:
        """
        Count a connection of C{fingerprint} waiting for a decision, or
        refuse it.
        """
        known = self.trustedBefore(fingerprint)
        cap = self.limits.maxWaitingPerKey if known else self.limits.maxWaitingPerNewKey
        count = self._waiting.get(fingerprint, 0)
        if count >= cap:
            raise Refused(
                f"{count} connections of this key already wait for a decision,"
                " the most this service holds"
            )
        self._waiting[fingerprint] = count + 1

    def releaseWaiting(self, fingerprint: str) -> None:
        count = self._waiting[fingerprint] - 1
        if count:
            self._waiting[fingerprint] = count
        else:
            del self._waiting[fingerprint]

    def waiting(self, fingerprint: str) -> int:
        return self._waiting.get(fingerprint, 0)

    @property
    def waitingTotal(self) -> int:
        """
        Connections of every key waiting for a decision (for the metrics).
        """
        return sum(self._waiting.values())

    # Held bytes

    def hold(self, size: int) -> bool:
        """
        Count C{size} (possibly negative) more bytes held.

        @return: whether the total is now over the budget.
        """
        self.heldBytes += size
        return self.heldBytes > self.limits.maxHeldBytes


def _remember(remembered: OrderedDict[str, None], item: str, most: int) -> None:
    remembered.pop(item, None)
    remembered[item] = None
    while len(remembered) > most:
        remembered.popitem(last=False)
