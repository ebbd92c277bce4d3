"""
The client sidecar: the daemon listens on a plain local endpoint and, for
each local connection, dials a remote dwtrust peer with its own identity and
relays between the two, with flow control in both directions.  An
application in any language is then a dwtrust client.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._protocol import CLOSE_GRACE, HandshakeFailed, _describe
from ._relay import fastWrites, noDelay

#: C{HOST:PORT}, C{[V6ADDRESS]:PORT}.
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[^\]=]+)\]|(?P<host>[^:=/\[\]]+)):(?P<port>\d+)$"
)


class SidecarError(ValueError):
    """
    A C{--connect} mapping that cannot be used; the message is one line.
    """


@frozen
class Mapping:
    """
    One C{--connect LOCAL=REMOTE}.

    @ivar local: the server endpoint description to listen on locally.
    @ivar remote: the remote peer as given, which its key is pinned under.
    @ivar remoteDescription: the client endpoint description to dial.
    """

    local: str
    remote: str
    remoteDescription: str

    @classmethod
    def parse(cls, text: str) -> Mapping:
        """
        Split C{LOCAL=REMOTE} at its last C{=} (a local endpoint description
        may hold C{=} of its own), and turn a C{HOST:PORT} remote into a TCP
        endpoint description.

        @raise SidecarError: if either side is missing.
        """
        local, sep, remote = text.rpartition("=")
        if not sep or not local or not remote:
            raise SidecarError(
                f"--connect {text!r}: expected LOCAL_ENDPOINT=REMOTE_HOST:PORT"
            )
        return cls(local, remote, remoteDescription(remote))

    def check(self, reactor: Any, public: bool = False) -> Mapping:
        """
        Check that both sides are endpoint descriptions, and keep the local
        side on loopback: anyone who reaches it speaks to the remote as this
        daemon.

        @param public: whether the local side may listen on an interface
            other than loopback (C{--connect-public}).
        @return: this mapping, with C{interface=127.0.0.1} (C{::1} for
            C{tcp6}) added to a C{tcp}, C{tcp6} or C{ssl} local endpoint
            that names no interface.
        @raise SidecarError: if a side is not an endpoint description, or
            the local side names an interface that is not loopback and
            C{public} is false.
        """
        try:
            endpoint = serverFromString(reactor, self.local)
        except (ValueError, KeyError, TypeError) as e:
            raise SidecarError(
                f"--connect: bad local endpoint {self.local!r}: {e}"
            ) from None
        local = self.local
        interface = getattr(endpoint, "_interface", None)
        if isinstance(interface, str):
            if interface in ("", "0.0.0.0", "::") and "interface=" not in local:
                loopback = "::1" if local.startswith("tcp6:") else LOOPBACK
                local += ":interface=" + loopback.replace(":", "\\:")
            elif not public and not _isLoopback(interface):
                raise SidecarError(
                    f"--connect: the local endpoint {self.local!r} listens on"
                    f" {interface or 'every interface'}, not loopback: anyone"
                    " who reaches it would speak to the remote as this daemon;"
                    " add --connect-public if that is meant"
                )
        try:
            remoteEndpoint(reactor, self.remote)
        except SidecarError as e:
            raise SidecarError(f"--connect: bad remote {e}") from None
        return (
            self
            if local == self.local
            else Mapping(local, self.remote, self.remoteDescription)
        )


#: Where a sidecar's local endpoint listens when it names no interface.
LOOPBACK = "127.0.0.1"


def _isLoopback(interface: str) -> bool:
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def remoteDescription(remote: str) -> str:
    """
    The client endpoint description for C{HOST:PORT} or C{[V6]:PORT}; any
    other text is taken to be a description already (L{remoteEndpoint}
    checks it).
    """
    match = _HOST_PORT.match(remote)
    if match is None:
        return remote
    host = match.group("v6") or match.group("host")
    port = match.group("port")
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


def remoteEndpoint(reactor: Any, remote: str) -> IStreamClientEndpoint:
    """
    The client endpoint for C{HOST:PORT}, C{[V6]:PORT} or a client endpoint
    description.

    @raise SidecarError: with one plain sentence naming C{remote}, if it is
        none of those, or its port is out of range.
    """
    if ":" not in remote:
        raise SidecarError(
            f"{remote!r} has no port: give HOST:PORT (or [V6ADDRESS]:PORT)"
        )
    description = remoteDescription(remote)
    try:
        endpoint: IStreamClientEndpoint = clientFromString(reactor, description)
    except ValueError as e:
        if str(e).startswith("Unknown endpoint type"):
            raise SidecarError(
                f"{remote!r} is neither HOST:PORT nor a client endpoint"
                " description: give HOST:PORT, with a port from 1 to 65535"
            ) from None
        raise SidecarError(_badDescription(remote)) from None
    except (KeyError, TypeError, IndexError):
        raise SidecarError(_badDescription(remote)) from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 < port < 65536:
        raise SidecarError(f"{remote!r}: the port {port} is out of range (1 to 65535)")
    return endpoint


def _badDescription(remote: str) -> str:
    return (
        f"{remote!r} is not a usable client endpoint description: an argument"
        " is missing, unknown or malformed (for TCP, give HOST:PORT or"
        " tcp:host=HOST:port=PORT)"
    )


class _Remote(Protocol):
    """
    The remote, authenticated side of a sidecar connection.
    """

    transport: Any  # an IAuthenticatedTransport, which is also a producer

    def __init__(self, local: SidecarProtocol) -> None:
        self._local = local

    def connectionMade(self) -> None:
        self._local.remoteConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._local.remoteData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._local.remoteLost(reason)


class SidecarProtocol(Protocol):
    """
    One local connection: dial the remote peer with dwtrust and relay.

    The local connection is not read from until the remote peer has accepted
    us, so no application byte leaves before both ends trust each other;
    anything read before then is kept and sent first, in order.  A refusal
    closes the local connection and is logged as C{dwtrust.sidecar.refused};
    a remote that cannot be reached, as C{dwtrust.sidecar.failed}.

    When the remote side ends, the local connection is half-closed, so that
    the local client reads a plain end of stream (not a reset over bytes it
    sent that nobody read); what it sends from then on is discarded, and the
    connection is aborted if it is not closed within L{CLOSE_GRACE} seconds.
    """

    factory: SidecarFactory
    transport: Any  # a plain stream transport, which is also a producer
    _log = Logger()

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._remote: ITransport | None = None
        self._writeRemote: Callable[[bytes], None] | None = None
        self._writeLocal: Callable[[bytes], None] | None = None
        self._trusted = False
        self._connecting: Deferred[Any] | None = None
        self._closed = False
        self._closing: IDelayedCall | None = None
        self._source = "?"

    def connectionMade(self) -> None:
        self._source = _describe(self.transport.getPeer())
        self.transport.pauseProducing()
        noDelay(self.transport)
        self._writeLocal = fastWrites(self.transport)
        remotes = Factory.forProtocol(lambda: _Remote(self))
        remotes.noisy = False
        connecting = self._connecting = self.factory.remote.connect(remotes)
        connecting.addCallbacks(self._connected, self._failed)

    # The remote side

    def remoteConnected(self, remote: Any) -> None:
        """
        The remote peer has proved itself; wait for it to accept us.
        """
        if self._closed:
            remote.loseConnection()
            return
        self._remote = remote
        noDelay(remote)
        remote.whenTrusted().addCallbacks(self._accepted, lambda _: None)

    def remoteData(self, data: bytes) -> None:
        """
        Bytes from the remote peer, for the local client.
        """
        assert self._writeLocal is not None
        self._writeLocal(data)

    def _accepted(self, _: object) -> None:
        remote = self._remote
        if self._closed or remote is None:
            return
        self._trusted = True
        write = self._writeRemote = fastWrites(remote)
        for data in self._pending:
            write(data)
        self._pending = []
        # Each side stops reading when the other cannot keep up.
        remote.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.transport.registerProducer(remote, True)
        self.transport.resumeProducing()

    def remoteLost(self, reason: Failure) -> None:
        """
        The remote connection is gone: report a refusal, and close ours.
        """
        self._remote = None
        if self._closed:
            return
        if reason.check(HandshakeFailed):
            self._refused(reason.value)  # type: ignore[arg-type]
        self._closeLocal()

    def _connected(self, remote: object) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if failure.check(CancelledError) or self._closed:
            return
        if failure.check(HandshakeFailed):
            self._refused(failure.value)  # type: ignore[arg-type]
        else:
            self._log.error(
                "dwtrust: sidecar cannot reach {remote} for {local}: {error}",
                event="dwtrust.sidecar.failed",
                local=self._source,
                remote=self.factory.remoteName,
                error=failure.getErrorMessage(),
            )
        self._closeLocal()

    def _closeLocal(self) -> None:
        """
        End the local connection: send what is buffered, then the end of
        stream, and discard what the local client still sends until it closes
        (or the grace time is over).
        """
        if self._closing is not None:
            return
        if self._trusted:
            # The remote no longer produces for us.
            self._trusted = False
            self.transport.unregisterProducer()
        self._pending = []
        halfClose = getattr(self.transport, "loseWriteConnection", None)
        if halfClose is None:
            self.transport.loseConnection()
            return
        halfClose()
        self._closing = self.factory.clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection
        )
        self.transport.resumeProducing()

    def _refused(self, failure: HandshakeFailed) -> None:
        self._log.warn(
            "dwtrust: sidecar connection from {local} to {remote} refused"
            " ({refusedBy}): {code}: {message}",
            event="dwtrust.sidecar.refused",
            code=failure.code.value,
            message=failure.message,
            byPeer=failure.byPeer,
            refusedBy="by the peer" if failure.byPeer else "by us",
            local=self._source,
            remote=self.factory.remoteName,
        )

    # The local side

    def dataReceived(self, data: bytes) -> None:
        if self._closing is not None:
            return
        if self._trusted and self._writeRemote is not None:
            self._writeRemote(data)
        else:
            self._pending.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._pending = []
        closing, self._closing = self._closing, None
        if closing is not None and closing.active():
            closing.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._remote is not None:
            if self._trusted:
                # The TLS layer waits for its producer (this connection, gone
                # now) to be unregistered before it sends close_notify.  (Not
                # once the remote connection is lost: then _remote is None.)
                self._trusted = False
                self._remote.unregisterProducer()  # type: ignore[attr-defined]
            self._remote.loseConnection()


class SidecarFactory(Factory):
    """
    Serves the local side of one C{--connect} mapping.

    @ivar remote: the dwtrust client endpoint of the remote peer.
    @ivar remoteName: the remote as given (its pin name), for the log.
    @ivar clock: times the grace given to a local client to close.
    """

    protocol = SidecarProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self, remote: IStreamClientEndpoint, remoteName: str, clock: IReactorTime
    ) -> None:
        self.remote = remote
        self.remoteName = remoteName
        self.clock = clock
