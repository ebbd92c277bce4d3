"""
Forwarding: the daemon's application protocol, which relays each
authenticated connection to a local application over a plain endpoint, with
flow control in both directions.  With several endpoints (instances of the
application behind a service router), connections go to each in turn, and
to the next one when one cannot be reached.
"""

from __future__ import annotations

from collections.abc import Sequence
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
            target=self._targetDescription,
            error=failure.getErrorMessage(),
        )
        if self._targets and not self._closed:
            self._connect()
            return
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
