"""
Attackers for the end-to-end tests of the limits on what a stranger may make
a daemon hold (tests/test_control_limits.py), run in a process of their own:

    python -m tests.attackers MODE JSON-ARGUMENTS

Each prints one JSON object with what happened, and exits 0.  They use
fresh keys, made in memory, and dial only the loopback addresses given.

- C{fields}: one control connection with a fresh key that sends one AMP
  message of C{fields} fields of C{size} bytes each; says whether and when
  the daemon closed the connection, and how much was sent by then.
- C{hold}: C{connections} control connections (C{keys} fresh keys, used in
  turn), held silent up to C{seconds}; says, for each, whether the
  handshake passed and when the daemon closed it.
- C{flood}: C{keys} fresh keys dial the daemon's port, C{concurrency} at a
  time, each from the next of C{sources} (bound as the local address);
  says, per key, the error code the daemon refused it with (or
  C{connected}).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from dwtrust import Identity
from dwtrust._identity import PeerIdentity
from dwtrust._policy import ITrustPolicy
from dwtrust._protocol import HandshakeFailed
from dwtrust._wrap import Authenticator


@implementer(ITrustPolicy)
class _AnyServer:
    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        return succeed(None)


class _Held(Protocol):
    """
    A connection that records when it closed, and may send a message.
    """

    def __init__(self, started: float, send: Callable[[_Held], None] | None) -> None:
        self.started = started
        self.send = send
        self.closedAfter: float | None = None
        self.sent = 0
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        if self.send is not None:
            self.send(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closedAfter = time.monotonic() - self.started
        self.closed.callback(None)


def _box(fields: int, size: int) -> list[bytes]:
    """
    One AMP box, in chunks: a command's fields, then C{fields} more of
    C{size} bytes.
    """

    def pair(key: bytes, value: bytes) -> bytes:
        return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value

    head = pair(b"_command", b"ListPending") + pair(b"_ask", b"1")
    value = b"x" * size
    chunks = [head]
    for start in range(0, fields, 64):
        count = min(64, fields - start)
        chunks.append(
            b"".join(pair(b"f%07d" % (start + n), value) for n in range(count))
        )
    chunks.append(b"\x00\x00")
    return chunks


async def _fields(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    identity = Identity.generate("acme", "mallory")
    authenticator = Authenticator(identity, None, _AnyServer(), reactor)
    endpoint = authenticator.clientEndpoint(
        clientFromString(reactor, args["control"]), "control"
    )
    started = time.monotonic()
    chunks = _box(args["fields"], args["size"])

    def send(held: _Held) -> None:
        # Write as the transport takes it, so that the client does not
        # buffer the whole message itself.
        pending = iter(chunks)

        def more() -> None:
            if held.closedAfter is not None:
                return
            for chunk in pending:
                assert held.transport is not None
                held.transport.write(chunk)
                held.sent += len(chunk)
                reactor.callLater(0.001, more)
                return

        more()

    protocol = await endpoint.connect(Factory.forProtocol(lambda: _Held(started, send)))
    assert isinstance(protocol, _Held)
    timeout = reactor.callLater(args["seconds"], protocol.transport.loseConnection)
    await protocol.closed
    if timeout.active():
        timeout.cancel()
    return {
        "closedAfter": protocol.closedAfter,
        "sent": protocol.sent,
        "total": sum(len(c) for c in chunks),
        "closedByDaemon": protocol.closedAfter is not None
        and protocol.closedAfter < args["seconds"],
    }


async def _hold(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    keys = [Identity.generate("acme", f"holder{n}") for n in range(args["keys"])]
    started = time.monotonic()
    held: list[_Held | float | None] = []
    for n in range(args["connections"]):
        authenticator = Authenticator(keys[n % len(keys)], None, _AnyServer(), reactor)
        endpoint = authenticator.clientEndpoint(
            clientFromString(reactor, args["control"]), "control"
        )
        try:
            protocol = await endpoint.connect(
                Factory.forProtocol(lambda: _Held(started, None))
            )
        except (ConnectionLost, ConnectionDone):
            # Closed before the server's ACCEPT arrived (version 2 connects
            # the client only then): closed at once.
            held.append(time.monotonic() - started)
            continue
        except Exception:
            held.append(None)
            continue
        assert isinstance(protocol, _Held)
        held.append(protocol)
        # Let the daemon act on it before the next one.
        await task.deferLater(reactor, 0.2, lambda: None)
    deadline = started + args["seconds"]
    while time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
    results = []
    for protocol in held:
        if protocol is None:
            results.append({"handshake": False, "closedAfter": None})
            continue
        if isinstance(protocol, float):
            results.append({"handshake": False, "closedAfter": protocol})
            continue
        results.append({"handshake": True, "closedAfter": protocol.closedAfter})
        if protocol.transport is not None and protocol.closedAfter is None:
            protocol.transport.loseConnection()
    return {"connections": results}


async def _flood(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    host, port = args["address"].rsplit(":", 1)
    sources: list[str] = args["sources"]
    outcomes: list[str] = []

    async def one(number: int) -> None:
        identity = Identity.generate("acme", f"stranger{number}")
        authenticator = Authenticator(
            identity, None, _AnyServer(), reactor, timeout=args.get("timeout", 30.0)
        )
        inner = TCP4ClientEndpoint(
            reactor, host, int(port), bindAddress=(sources[number % len(sources)], 0)
        )
        endpoint = authenticator.clientEndpoint(inner, args["address"])
        try:
            protocol = await endpoint.connect(Factory.forProtocol(_Outcome))
        except HandshakeFailed as e:
            outcomes.append(_code(e))
            return
        except Exception as e:
            outcomes.append(type(e).__name__)
            return
        # The client is connected before the server has decided: its
        # refusal, if any, ends the connection.
        assert isinstance(protocol, _Outcome)
        late = reactor.callLater(args.get("wait", 30.0), protocol.giveUp)
        outcomes.append(await protocol.lost)
        if late.active():
            late.cancel()

    numbers = iter(range(args["keys"]))
    work = (one(n) for n in numbers)
    cooperator = task.Cooperator()
    await defer.gatherResults(
        [
            cooperator.coiterate(Deferred.fromCoroutine(w) for w in work)
            for _ in range(args["concurrency"])
        ]
    )
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"outcomes": counts}


def _code(error: HandshakeFailed) -> str:
    return error.code.value if error.byPeer else "local-" + error.code.value


class _Outcome(Protocol):
    """
    How a connection ended: the code the server refused it with, or
    C{connected} if it was still open when given up on.
    """

    def __init__(self) -> None:
        self.lost: Deferred[str] = Deferred()
        self._gaveUp = False

    def giveUp(self) -> None:
        self._gaveUp = True
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._gaveUp:
            outcome = "connected"
        elif isinstance(reason.value, HandshakeFailed):
            outcome = _code(reason.value)
        else:
            outcome = "closed"
        self.lost.callback(outcome)


MODES = {"fields": _fields, "hold": _hold, "flood": _flood}


def main() -> None:
    mode, arguments = sys.argv[1], json.loads(sys.argv[2])

    async def run(reactor: Any) -> None:
        result = await MODES[mode](reactor, arguments)
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
