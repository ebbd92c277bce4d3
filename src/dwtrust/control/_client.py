"""
An owner's end of the control channel.

    client = await openControl(reactor, ownerIdentity, "unix:/run/billing/control.sock",
                               pins)
    listing = await client.pending()
    entry = listing.entries[0]
    await client.decide(signDecision(ownerIdentity, client.peer, entry,
                                     "approved", time.time(), "the new billing box"))
    client.close()

The service's key is pinned on first use under the endpoint description, as
for any service the owner dials; the owner's key must be registered on the
service, or the connection is refused with C{denied}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._bus import ControlMessage
from .._decision import SignedDecision
from .._identity import Identity, IdentityError, PeerIdentity, PublicKey
from .._policy import PinningPolicy
from .._protocol import IAuthenticatedTransport
from .._wrap import DEFAULT_TIMEOUT, Authenticator
from ..store import IKnownServices
from ._protocol import Decide, ListPeers, ListPending, Notify, Watch, decodeMessage

#: The most entries a listing gathers, page after page, unless told otherwise.
DEFAULT_LIMIT = 10_000


@frozen
class Listing:
    """
    The entries of a list the service sent (see L{ListPending} and
    L{ListPeers}), perhaps not all of them.

    @ivar entries: the entries received, oldest first.
    @ivar total: how many there are in all.
    """

    entries: tuple[dict[str, Any], ...]
    total: int

    @property
    def omitted(self) -> int:
        """
        How many entries were not received.
        """
        return max(self.total - len(self.entries), 0)


class ControlProtocol(amp.AMP):
    """
    The AMP protocol of an owner's control connection: it answers the
    service's L{Notify} commands by calling C{onMessage}.

    @ivar onMessage: called with each control message the service pushes.
    """

    log = Logger()

    def __init__(self) -> None:
        amp.AMP.__init__(self)
        self.onMessage: Callable[[ControlMessage], object] | None = None
        self.lostReason: Failure | None = None
        self._closing: list[Deferred[None]] = []

    @Notify.responder
    def notify(self, message: str) -> dict[str, str]:
        try:
            decoded = decodeMessage(message)
        except ValueError as e:
            self.log.warn(
                "dwtrust: the service sent a malformed control message: {error}",
                error=str(e),
            )
            return {}
        if self.onMessage is not None:
            self.onMessage(decoded)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason
        amp.AMP.connectionLost(self, reason)
        closing, self._closing = self._closing, []
        for waiting in closing:
            waiting.callback(None)

    def whenClosed(self) -> Deferred[None]:
        """
        Fires once the connection is closed.
        """
        if self.lostReason is not None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._closing.append(waiting)
        return waiting


#: Seconds a closing control connection may take before it is aborted.
CLOSE_GRACE = 2.0


class ControlClient:
    """
    An owner's open control connection to one service.

    @ivar protocol: the connection.
    @ivar peer: the service's identity, as it proved it.
    """

    def __init__(self, protocol: ControlProtocol, peer: PeerIdentity) -> None:
        self.protocol = protocol
        self.peer = peer
        self._amp: amp.AMP = protocol

    @property
    def service(self) -> str:
        """
        The service's C{org/service}: what the decisions sent here must name.
        """
        return self.peer.name

    def pending(
        self, prefix: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Deferred[Listing]:
        """
        The pending requests (those whose identifier or fingerprint starts
        with C{prefix}, if given), at most C{limit} of them.
        """
        return Deferred.fromCoroutine(self._list(ListPending, prefix, limit))

    def peers(
        self, prefix: str | None = None, limit: int = DEFAULT_LIMIT
    ) -> Deferred[Listing]:
        """
        The keys with a decision (those whose fingerprint starts with
        C{prefix}, if given), at most C{limit} of them.
        """
        return Deferred.fromCoroutine(self._list(ListPeers, prefix, limit))

    async def _list(
        self, command: type[amp.Command], prefix: str | None, limit: int
    ) -> Listing:
        entries: list[dict[str, Any]] = []
        total = 0
        while len(entries) < limit:
            arguments: dict[str, Any] = {"offset": len(entries)}
            if prefix:
                arguments["prefix"] = prefix
            answer = await self._amp.callRemote(command, **arguments)
            received = json.loads(answer["page"])
            total = received["total"]
            entries.extend(received["entries"])
            if not received["entries"] or len(entries) >= total:
                break
        return Listing(tuple(entries[:limit]), max(total, len(entries[:limit])))

    def decide(self, decision: SignedDecision) -> Deferred[dict[str, Any]]:
        """
        Send a signed decision.

        @return: a L{Deferred} that fires with the key's record as it now
            stands (a L{ListPeers} entry), or fails with
            L{DecisionRefused} saying why the service did not apply it.
        """

        async def deciding() -> dict[str, Any]:
            answer = await self._amp.callRemote(Decide, decision=decision.encode())
            record: dict[str, Any] = json.loads(answer["peer"])
            return record

        return Deferred.fromCoroutine(deciding())

    def watch(self, callback: Callable[[ControlMessage], object]) -> Deferred[None]:
        """
        Call C{callback} with every control message the service sends from
        now on, until the connection closes.

        @return: a L{Deferred} that fires once the service is sending.
        """
        self.protocol.onMessage = callback
        watching: Deferred[Any] = self._amp.callRemote(Watch)
        return watching.addCallback(lambda _: None)

    def whenClosed(self) -> Deferred[None]:
        """
        Fires once the connection is closed, by either end.
        """
        return self.protocol.whenClosed()

    def close(
        self, clock: IReactorTime | None = None, grace: float = CLOSE_GRACE
    ) -> Deferred[None]:
        """
        Close the connection; fire once it is closed.  If C{clock} is given
        and the service has not finished closing (TLS waits for its
        C{close_notify}) within C{grace} seconds, the connection is aborted,
        so that a command never hangs on its way out.
        """
        closed = self.protocol.whenClosed()
        transport = self.protocol.transport
        if transport is not None:
            transport.loseConnection()
            if clock is not None:
                late = clock.callLater(
                    grace,
                    transport.abortConnection,  # type: ignore[attr-defined]
                )

                def done(result: object) -> object:
                    if late.active():
                        late.cancel()
                    return result

                closed.addBoth(done)
        return closed


def subjectOf(entry: dict[str, Any]) -> PeerIdentity:
    """
    The key a L{ListPending} or L{ListPeers} entry describes, checked against
    the fingerprint and algorithm the entry shows.

    @raise IdentityError: if the entry's key does not parse or does not match.
    """
    key = PublicKey.fromOpenSSH(str(entry.get("publicKey", "")))
    if key.fingerprint != entry.get("fingerprint"):
        raise IdentityError(
            f"the service sent a key that does not match {entry.get('fingerprint')}"
        )
    if key.algorithm.name != entry.get("algorithm"):
        raise IdentityError(
            f"the service sent a {key.algorithm.name} key for a"
            f" {entry.get('algorithm')} one"
        )
    return PeerIdentity(str(entry["org"]), str(entry["service"]), key)


def signDecision(
    owner: Identity,
    service: PeerIdentity,
    entry: dict[str, Any],
    state: str,
    now: float,
    reason: str,
) -> SignedDecision:
    """
    An owner's signed decision about the key C{entry} describes, for
    C{service} (as the control connection authenticated it: its name and
    its key), at the next place in the key's history after the entry's
    C{sequence}.

    @param state: C{approved}, C{denied}, C{revoked} or C{blocked}; or
        C{release} or C{withhold} for a key request.
    @raise IdentityError: if the entry's key does not parse or does not match.
    """
    sequence = int(entry.get("sequence", 0) or 0) + 1
    return SignedDecision.make(
        owner,
        service.name,
        subjectOf(entry),
        state,
        now,
        reason,
        service.fingerprint,
        sequence,
    )


async def openControl(
    reactor: Any,
    identity: Identity,
    endpointDescription: str,
    store: IKnownServices,
    pinName: str | None = None,
    expected: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> ControlClient:
    """
    Connect to a service's control endpoint as the owner C{identity}.

    @param endpointDescription: a client endpoint description, such as
        C{unix:/var/lib/billing/control.sock} or
        C{tcp:host=billing.example:port=8444}.
    @param store: the owner's pins; the service's key is pinned under
        C{pinName} (by default, the description) on first use.
    @param expected: if given, the C{org/service} the service must be.
    @raise HandshakeFailed: (in the coroutine) if the service refuses this
        owner, or this owner refuses the service's key.
    """
    authenticator = Authenticator(
        identity, None, PinningPolicy(store, False, expected), reactor, timeout
    )
    endpoint = authenticator.clientEndpoint(
        clientFromString(reactor, endpointDescription),
        pinName if pinName is not None else endpointDescription,
    )
    protocol = await endpoint.connect(Factory.forProtocol(ControlProtocol))
    assert isinstance(protocol, ControlProtocol)
    transport = IAuthenticatedTransport(protocol.transport)
    return ControlClient(protocol, transport.peer)
