"""
Forwarding: the daemon's application protocol, which relays each
authenticated connection to a local application over a plain endpoint, with
flow control in both directions.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure


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
        self._peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._peer.transport.loseConnection()


class ForwardingProtocol(Protocol):
    """
    Relays an authenticated connection to C{factory.target}.  Until the local
    connection is up, bytes from the peer are kept and the peer is not read
    from.
    """

    factory: ForwardingFactory
    transport: Any  # an IAuthenticatedTransport, which is also a producer
    _log = Logger()

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._local: ITransport | None = None
        self._connecting: Deferred[Any] | None = None
        self._closed = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        relays = Factory.forProtocol(lambda: _Relay(self))
        relays.noisy = False
        connecting = self._connecting = self.factory.target.connect(relays)
        connecting.addCallbacks(self._connected, self._failed)

    def localConnected(self, local: ITransport) -> None:
        if self._closed:
            local.loseConnection()
            return
        self._local = local
        for data in self._pending:
            local.write(data)
        self._pending = []
        # Each side stops reading when the other cannot keep up.
        local.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(local, True)
        self.transport.resumeProducing()

    def _connected(self, relay: object) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError):
            return
        self._log.error(
            "dwtrust: cannot reach the local application at {target}: {error}",
            event="dwtrust.forward.failed",
            target=self.factory.targetDescription,
            error=failure.getErrorMessage(),
        )
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._local is None:
            self._pending.append(data)
        else:
            self._local.write(data)

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

    def __init__(self, target: IStreamClientEndpoint, targetDescription: str) -> None:
        self.target = target
        self.targetDescription = targetDescription
