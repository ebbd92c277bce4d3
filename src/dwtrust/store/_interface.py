"""
The trust store's contract: what a service knows about the keys of its peers,
and (on the client side) which key each server it has dialled had.

Every method returns a L{Deferred}; no implementation may block the reactor
thread.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface

from .._identity import PeerIdentity


class KeyState(enum.Enum):
    """
    Where a peer key stands.
    """

    pending = "pending"
    approved = "approved"
    denied = "denied"
    revoked = "revoked"
    blocked = "blocked"


@frozen
class KeyRecord:
    """
    What the store holds about one peer key.

    @ivar fingerprint: C{SHA256:...} of C{publicKey}; the record's key.
    @ivar publicKey: the key in OpenSSH wire format.
    @ivar firstSeen: POSIX time of the first attempt with this key.
    @ivar lastSeen: POSIX time of the latest attempt.
    @ivar attempts: how many connections presented this key.
    @ivar source: the address of the latest attempt.
    @ivar decidedBy: who made the current decision (an approver or owner).
    @ivar decision: the newest signed decision about the key (the one with
        the highest C{sequence} in the store's append-only history), encoded
        (see L{dwtrust._decision.SignedDecision}); empty if there is none.
        The store does not check it: L{dwtrust._authority} does.
    @ivar requestId: for a pending key, the request's identifier.
    @ivar expires: for a pending key, when the request lapses.
    @ivar sequence: the place in the key's history the store filed
        C{decision} under (-1 if there is none).  A decision whose own
        signed sequence differs from it was not stored by dwtrust.
    @ivar sentBy: who handed C{decision} to the store: the fingerprint of
        the owner whose control connection sent it, or of the service
        itself (empty for a decision from before version 3 of the schema).
    """

    fingerprint: str
    org: str
    service: str
    algorithm: str
    publicKey: bytes
    state: KeyState
    firstSeen: float
    lastSeen: float
    attempts: int
    source: str
    decidedBy: str
    decision: bytes = b""
    requestId: str = ""
    expires: float = 0.0
    sequence: int = -1
    sentBy: str = ""


#: The prefix lengths sources are grouped by: one site's addresses share an
#: IPv4 /24, and one host (or customer) may hold a whole IPv6 /64.
IPV4_PREFIX = 24
IPV6_PREFIX = 64


def sourceHost(source: str) -> str:
    """
    The address prefix a source is grouped under, for the caps on what
    strangers may make a service hold: an IPv4 address's /24
    (C{"10.1.2.3:5678"} gives C{"10.1.2.0/24"}), an IPv6 address's /64
    (C{"[2001:db8::1]:5678"} gives C{"2001:db8::/64"}; an IPv4-mapped one
    counts as IPv4), whatever port each connection came from.  A source
    that is not an IP address (a UNIX socket) is its own group.
    """
    return hostPrefix(_host(source))


@functools.lru_cache(maxsize=4096)
def hostPrefix(host: str) -> str:
    """
    The prefix an IP address is grouped under (see L{sourceHost}); C{host}
    itself if it is no IP address.

    Every connection asks this of its source, and parsing an address takes
    tens of microseconds: the answers for recent hosts are remembered.
    """
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    bits = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def _host(source: str) -> str:
    """
    The host part of a source address (C{"10.1.2.3:5678"} gives
    C{"10.1.2.3"}, C{"[::1]:5678"} gives C{"::1"}).
    """
    if source.startswith("["):
        host, bracket, _ = source[1:].partition("]")
        return host if bracket else source
    host, colon, port = source.rpartition(":")
    return host if colon and port.isdigit() and ":" not in host else source


class DecisionConflict(Exception):
    """
    The store already holds a decision at that place in the key's history:
    another decision was made meanwhile, or this one was sent before.
    """


class PendingFull(Exception):
    """
    A new pending request would exceed a cap: the message says which.
    """


def checkPendingCaps(
    host: str,
    fromHost: int,
    total: int,
    maxPerSource: int,
    maxTotal: int,
    what: str = "requests",
) -> None:
    """
    The one rule of the pending caps, for every store and queue that keeps
    requests: a new request is refused when C{host} already has
    C{maxPerSource} of them (C{fromHost}), or when C{maxTotal} are
    pending in all (C{total}).

    @raise PendingFull: saying which cap.
    """
    if fromHost >= maxPerSource:
        raise PendingFull(
            f"{host} already has {fromHost} pending {what} (at most {maxPerSource})"
        )
    if total >= maxTotal:
        raise PendingFull(f"{total} {what} are pending already (at most {maxTotal})")


@frozen
class Pin:
    """
    The key a server had the first time we dialled its address.
    """

    address: str
    org: str
    service: str
    algorithm: str
    publicKey: bytes
    fingerprint: str
    firstSeen: float

    @classmethod
    def of(cls, address: str, peer: PeerIdentity, now: float) -> Pin:
        """
        The pin for C{peer}'s key at C{address}, made at C{now}.
        """
        return cls(
            address,
            peer.org,
            peer.service,
            peer.algorithm,
            peer.publicKey.blob,
            peer.fingerprint,
            now,
        )


class ITrustStore(Interface):
    """
    The keys of the peers that connect to a service, and their states.
    """

    def lookup(fingerprint: str) -> Deferred[KeyRecord | None]:
        """
        The record for a key, with its newest decision (see L{KeyRecord}), or
        L{None} if this key was never recorded.  A key with a decision but
        no other record (its row removed behind the store's back) is found
        all the same.
        """

    def keysFor(org: str, service: str) -> Deferred[list[KeyRecord]]:
        """
        Every record for keys that claimed C{org}/C{service}.
        """

    def record(
        peer: PeerIdentity,
        state: KeyState,
        source: str,
        decidedBy: str,
        decision: bytes = b"",
        sequence: int = 0,
        sentBy: str = "",
    ) -> Deferred[KeyRecord]:
        """
        Append a decision about C{peer}'s key to the key's history, at
        C{sequence}, and make it the key's state, creating its record if
        need be.  Decisions are never updated or deleted: the one with the
        highest sequence is the key's newest.

        @param decision: the encoded signed decision.
        @param sequence: its place in the key's history, as signed in it.
        @param sentBy: the fingerprint of whoever handed it over.
        @return: (in the L{Deferred}) the key's record as L{lookup} reads it.
        @raise DecisionConflict: (in the L{Deferred}) if the history already
            has a decision at C{sequence}; nothing is stored then.
        """

    def addPending(
        peer: PeerIdentity,
        source: str,
        requestId: str,
        expires: float,
        maxPerSource: int,
        maxTotal: int,
    ) -> Deferred[tuple[KeyRecord, bool]]:
        """
        Record a request for approval of C{peer}'s key, or count one more
        attempt on the request already pending for it (one per key).

        @return: the pending record, and whether it is new.
        @raise PendingFull: (in the L{Deferred}) if a new request would put
            more than C{maxPerSource} pending requests from C{source}, or more
            than C{maxTotal} in all.
        """

    def pending() -> Deferred[list[KeyRecord]]:
        """
        Every pending request, oldest first.
        """

    def decided() -> Deferred[list[KeyRecord]]:
        """
        Every key with a decision (not pending), oldest first.
        """

    def expirePending(now: float) -> Deferred[list[KeyRecord]]:
        """
        Remove the pending requests that lapsed before C{now}; fire with them.
        """

    def owners() -> Deferred[list[bytes]]:
        """
        The owner registrations kept in the store (encoded signed decisions,
        signed by the service itself).
        """

    def addOwner(fingerprint: str, registration: bytes) -> Deferred[None]:
        """
        Keep an owner registration.
        """

    def seen(fingerprint: str, source: str) -> Deferred[None]:
        """
        Count one more connection attempt with a recorded key.
        """

    def close() -> Deferred[None]:
        """
        Release the store's resources.
        """


class IKnownServices(Interface):
    """
    A client's pins: the server key first seen at each address it dialled,
    as ssh's C{known_hosts}.
    """

    def pinned(address: str) -> Deferred[Pin | None]:
        """
        The pin for C{address}, if there is one.
        """

    def pinnedService(org: str, service: str) -> Deferred[list[Pin]]:
        """
        Every pin whose server claimed C{org}/C{service}.
        """

    def pin(address: str, peer: PeerIdentity) -> Deferred[Pin]:
        """
        Remember C{peer}'s key for C{address}.
        """

    def unpin(address: str) -> Deferred[bool]:
        """
        Forget the pin for C{address}; fire with whether there was one.
        """


@frozen
class StoreChange:
    """
    A change to a store shared with other instances, as it was announced.

    @ivar kind: C{decided} (a key's decision was stored), C{pending} (a new
        pending request) or C{owner} (an owner registration).
    @ivar fingerprint: the key concerned (the owner's, for C{owner}).
    @ivar record: the key's record as read after the change (L{None} if it
        is gone, or for C{owner}).
    @ivar local: whether this store object made the change itself.
    """

    kind: str
    fingerprint: str
    record: KeyRecord | None
    local: bool


class IStoreEvents(Interface):
    """
    A store shared by several instances, which announces what changes in it.
    """

    def watch(watcher: Callable[[StoreChange], object]) -> Callable[[], None]:
        """
        Call C{watcher} (in the reactor thread) with every change from now
        on, from this instance or any other.

        @return: a function that stops it.
        """
