"""
Forwarding: the daemon's application protocol, which relays each
authenticated connection to a local application over a plain endpoint, with
flow control in both directions.  With several endpoints (instances of the
application behind a service router), connections go to each in turn, and
to the next one when one cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._identity import PeerIdentity
from ._machine import Refusal
from ._protocol import IBeforeAccept
from ._relay import fastWrites, noDelay
from ._wire import ErrorCode

#: The start of the message of the C{unavailable} refusal a daemon sends when
#: it trusts the peer but cannot reach the application behind it (see
#: C{docs/protocol.rst}); clients may tell it from other refusals by it.
APPLICATION_DOWN = "the application behind this service cannot be reached"


class _Relay(Protocol):
    """
    The local side of a forwarded connection.
    """

    transport: ITransport

    def __init__(self, peer: ForwardingProtocol) -> None:
        self._peer = peer

    def connectionMade(self) -> None:
        self._peer.localConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._peer.localData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._peer.localLost()


@implementer(IBeforeAccept)
class ForwardingProtocol(Protocol):
    """
    Relays an authenticated connection to C{factory.target}.

    Behind a dwtrust server, the local connection is made once the peer is
    trusted and before it is accepted (L{beforeAccept}): if no endpoint of
    the application can be reached, the peer is refused with C{unavailable}
    and a message starting with L{APPLICATION_DOWN}, rather than accepted
    and then closed.  Connected otherwise, it makes the local connection
    first, keeping bytes from the peer and not reading from it meanwhile.
    """

    factory: ForwardingFactory
    transport: Any  # an IAuthenticatedTransport, which is also a producer
    _log = Logger()

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._local: ITransport | None = None
        self._writeLocal: Callable[[bytes], None] | None = None
        self._writePeer: Callable[[bytes], None] | None = None
        self._localGone = False
        self._connecting: Deferred[Any] | None = None
        self._ready: Deferred[None] | None = None
        self._gated = False
        self._closed = False
        self.transport = None

    def beforeAccept(self, peer: PeerIdentity) -> Deferred[None]:
        """
        Reach the application before the peer is accepted.
        """
        self._gated = True
        self._ready = Deferred(lambda _: self._giveUp())
        self._peerName = peer.name
        self._start()
        return self._ready

    def _giveUp(self) -> None:
        # The handshake failed while we were getting ready.
        self._ready = None
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        if self._local is not None:
            self._local.loseConnection()

    def connectionMade(self) -> None:
        if not self._gated:
            self.transport.pauseProducing()
            self._start()
            return
        if self._local is None or self._localGone:
            self.transport.loseConnection()
            return
        self._splice()

    def _start(self) -> None:
        relays = Factory.forProtocol(lambda: _Relay(self))
        relays.noisy = False
        self._relays = relays
        self._targets = self.factory.inTurn()
        self._connect()

    def _connect(self) -> None:
        self._target, self._targetDescription = self._targets.pop(0)
        connecting = self._connecting = self._target.connect(self._relays)
        connecting.addCallbacks(self._connected, self._failed)

    def localConnected(self, local: ITransport) -> None:
        if self._closed:
            local.loseConnection()
            return
        self._local = local
        noDelay(local)
        self._writeLocal = fastWrites(local)
        ready, self._ready = self._ready, None
        if ready is not None:
            # Accepting the peer connects us (see connectionMade); until
            # then, what the application sends first waits in its socket.
            local.pauseProducing()  # type: ignore[attr-defined]
            ready.callback(None)
            return
        self._splice()

    def _splice(self) -> None:
        local = self._local
        assert local is not None and self._writeLocal is not None
        noDelay(self.transport)
        self._writePeer = fastWrites(self.transport)
        for data in self._pending:
            self._writeLocal(data)
        self._pending = []
        # Each side stops reading when the other cannot keep up.
        local.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(local, True)
        self.transport.resumeProducing()
        if self._gated:
            local.resumeProducing()  # type: ignore[attr-defined]

    def localData(self, data: bytes) -> None:
        if self._writePeer is not None:
            self._writePeer(data)

    def localLost(self) -> None:
        self._localGone = True
        if self.transport is not None and not self._closed:
            # The TLS layer waits for its producer (the local connection,
            # gone now) to be unregistered before it sends close_notify.
            # (Not once the peer's connection is lost: then it is too late,
            # and the TLS layer has nothing left to shut down.)
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _connected(self, relay: object) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        self._log.error(
            "dwtrust: cannot reach the local application at {target}: {error}",
            event="dwtrust.forward.failed",
            target=self._targetDescription,
            error=failure.getErrorMessage(),
        )
        if self._targets and not self._closed:
            self._connect()
            return
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.errback(
                Refusal(
                    ErrorCode.unavailable,
                    f"{APPLICATION_DOWN}; try again once it runs",
                )
            )
            return
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._writeLocal is None:
            self._pending.append(data)
        else:
            self._writeLocal(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._pending = []
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._local is not None:
            self._local.loseConnection()


class ForwardingFactory(Factory):
    protocol = ForwardingProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, targets: Sequence[tuple[IStreamClientEndpoint, str]]) -> None:
        """
        @param targets: the application's endpoints, each with its
            description (for the log).
        """
        if not targets:
            raise ValueError("forwarding needs at least one endpoint")
        self.targets = list(targets)
        self._next = 0

    def inTurn(self) -> list[tuple[IStreamClientEndpoint, str]]:
        """
        Every endpoint, starting with the one whose turn it is (the order a
        connection tries them in), and the turn passes to the next one.
        """
        start = self._next % len(self.targets)
        self._next += 1
        return self.targets[start:] + self.targets[:start]
