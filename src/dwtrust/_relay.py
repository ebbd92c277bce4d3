"""
The fast path shared by the two relays (the forwarding daemon, L{_forward},
and the client sidecar, L{_sidecar}): each message they carry is read from
one connection and written to the other, and with plain Twisted each such
write waits for the reactor's next turn twice, once in the TLS layer (which
gathers small writes until then) and once in the TCP transport (which writes
only when the reactor reports the socket writable).  Through two hops that is
four more reactor turns, each with its system calls, per message and per
direction.

L{fastWrites} removes both waits for a connection the relay owns: a write is
encrypted at once, and its bytes go to the socket at once when nothing is
queued before them (what the socket does not take is queued as before, and
the transport's flow control sees it as usual).  L{noDelay} turns off Nagle's
algorithm, as stunnel does, so that a small message leaves at once even while
an earlier one is unacknowledged.

These reach into the transports Twisted builds (C{tcp.Connection} and
C{TLSMemoryBIOProtocol}); anything else is left as it is, so the relays work
unchanged, only slower, over any other transport.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.tcp import Connection
from twisted.protocols.tls import TLSMemoryBIOProtocol

#: The address families of TCP connections (a UNIX connection, which Twisted
#: also builds on its TCP connection, is left as it is).
_INET = (socket.AF_INET, socket.AF_INET6)


def _tls(transport: Any) -> TLSMemoryBIOProtocol | None:
    """
    The TLS layer of C{transport}: itself, or the one under an
    L{AuthenticatedTransport <dwtrust._protocol.AuthenticatedTransport>}.
    """
    tls = getattr(transport, "_tls", transport)
    return tls if isinstance(tls, TLSMemoryBIOProtocol) else None


def _tcp(transport: Any) -> Any:
    """
    The TCP connection that carries C{transport} (under its TLS layer, if it
    has one), or L{None} if it is not a TCP connection Twisted made (over
    IPv4 or IPv6).
    """
    tls = _tls(transport)
    connection = tls.transport if tls is not None else transport
    if (
        not isinstance(connection, Connection)
        or not connection.connected
        # TLS started on the connection itself (an ssl: endpoint): its
        # write encrypts, and is left as it is.
        or connection.TLS
    ):
        return None
    return connection if connection.socket.family in _INET else None


def noDelay(transport: Any) -> None:
    """
    Turn off Nagle's algorithm on the TCP connection under C{transport}, if
    there is one.
    """
    connection = _tcp(transport)
    setter = getattr(connection, "setTcpNoDelay", None)
    if setter is not None:
        # A connection already gone has its loss reported anyway.
        with contextlib.suppress(OSError):
            setter(True)


class _SendNow:
    """
    A TCP transport's C{write} that sends at once when nothing is queued,
    and queues (with the transport's own C{write}) what the socket does not
    take, or everything when the transport has bytes queued, is closing, is
    closed, is being aborted or has started TLS, or the TLS layer over it
    is being aborted (where its own C{write} and abort decide).
    """

    def __init__(self, connection: Any, tls: TLSMemoryBIOProtocol | None) -> None:
        self._connection = connection
        self._tls = tls
        self._queue: Callable[[bytes], None] = connection.write
        self._send: Callable[[bytes], int] = connection.socket.send

    def __call__(self, data: bytes) -> None:
        connection = self._connection
        if (
            connection.dataBuffer
            or connection._tempDataBuffer
            or connection.disconnecting
            or not connection.connected
            or connection.TLS
            or not data
            # Aborting drops what is queued, so queue it: the close_notify a
            # TLS layer writes as it aborts must not go (an abort is a cut).
            or connection._aborting
            or (self._tls is not None and self._tls._aborted)
        ):
            self._queue(data)
            return
        try:
            sent = self._send(data)
        except OSError:
            # Full (EAGAIN) or broken: queued, the reactor writes it or
            # reports the loss, as for any write.
            sent = 0
        if sent < len(data):
            self._queue(data[sent:] if sent else data)


def fastWrites(transport: Any) -> Callable[[bytes], None]:
    """
    Make writes to C{transport} leave at once (see the module's description),
    and return its C{write} (bound now: use it rather than looking it up on
    every write).

    Call it before writing anything more to C{transport}: bytes its TLS layer
    still gathers from earlier writes (the handshake's last frame) are sent
    first, so nothing is reordered.
    """
    tls = _tls(transport)
    connection = _tcp(transport)
    if connection is not None and not isinstance(connection.write, _SendNow):
        connection.write = _SendNow(connection, tls)
    if tls is None:
        write: Callable[[bytes], None] = transport.write
        return write
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is None:
        return tls.write
    # Send what the TLS layer gathered so far, then write through it
    # unbuffered (as Twisted's BufferingTLSTransport does once closed).
    aggregator.flush()
    direct: Callable[[bytes], None] = TLSMemoryBIOProtocol.write.__get__(tls)

    def writeSequence(data: Any) -> None:
        direct(b"".join(data))

    for layer in {id(tls): tls, id(transport): transport}.values():
        layer.write = direct
        layer.writeSequence = writeSequence
    return direct
