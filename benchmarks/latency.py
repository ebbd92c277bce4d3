"""
Latency to the first application byte: from the client's TCP connect to the
first byte the server's application sends (it writes one byte as soon as it is
connected), for dwtrust and for a bare TLS 1.3 handshake with mutual
self-signed P-256 certificates.

Measured twice: directly on loopback (milliseconds), and through a relay, in a
process of its own, that delays every chunk by D in each direction, so that
the time divided by 2D counts the round trips.  The relay accepts the TCP
connection itself at once, so the count starts after TCP's own round trip,
which both systems pay alike.

    python -m benchmarks.latency [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from . import _common
from ._common import HOST, ServerProcess

MODULE = "benchmarks.latency"


class Greeter(Protocol):
    """
    The server's application: one byte as soon as it is connected.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"!")  # type: ignore[union-attr]


def server(reactor: Any, system: str, pathsJSON: str) -> Deferred[None]:
    paths = json.loads(pathsJSON)
    factory = Factory.forProtocol(Greeter)
    factory.noisy = False
    return _common.serveSystem(reactor, system, paths, factory)


# --- The delaying relay ------------------------------------------------------


class _Delayed:
    """
    Delivers chunks to C{write} C{delay} seconds after they arrive, in order.
    """

    def __init__(self, reactor: Any, delay: float) -> None:
        self._reactor = reactor
        self._delay = delay
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._call: Any = None
        self.target: Any = None
        self.closing = False

    def push(self, data: bytes) -> None:
        self._queue.append((time.monotonic() + self._delay, data))
        self._schedule()

    def close(self) -> None:
        self.closing = True
        self._schedule()

    def _schedule(self) -> None:
        if self._call is not None or self.target is None:
            return
        if self._queue:
            wait = max(0.0, self._queue[0][0] - time.monotonic())
            self._call = self._reactor.callLater(wait, self._flush)
        elif self.closing:
            self.target.loseConnection()

    def _flush(self) -> None:
        self._call = None
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            self.target.write(self._queue.popleft()[1])
        self._schedule()

    def attach(self, target: Any) -> None:
        self.target = target
        self._schedule()


class _RelaySide(Protocol):
    def __init__(self, outbound: _Delayed, inbound: _Delayed) -> None:
        self.outbound = outbound  # what we receive goes out this way
        self.inbound = inbound  # what the other side receives comes to us

    def connectionMade(self) -> None:
        self.inbound.attach(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.outbound.push(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.outbound.close()


def relay(reactor: Any, upstream: int, delay: float) -> Deferred[None]:
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)

    class Accepted(Protocol):
        def connectionMade(self) -> None:
            toServer = _Delayed(reactor, delay)
            toClient = _Delayed(reactor, delay)
            self.side = _RelaySide(toServer, toClient)
            self.side.makeConnection(self.transport)  # type: ignore[no-untyped-call]
            upstreamSide = _RelaySide(toClient, toServer)
            connecting = TCP4ClientEndpoint(reactor, HOST, upstream).connect(
                Factory.forProtocol(lambda: upstreamSide)
            )
            connecting.addErrback(self._failed)

        def _failed(self, reason: Failure) -> None:
            self.transport.loseConnection()  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            self.side.dataReceived(data)

        def connectionLost(self, reason: Failure | None = None) -> None:
            self.side.connectionLost(reason)

    factory = Factory.forProtocol(Accepted)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface=HOST)
    _common.serveCommands(reactor, {"port": port.getHost().port}, dict)
    return finished


# --- The client ----------------------------------------------------------------


class _FirstByte(Protocol):
    def __init__(self, started: float, got: Deferred[float]) -> None:
        self.started = started
        self.got = got

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(time.monotonic() - self.started)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.got.called:
            self.got.errback(reason or Failure(RuntimeError("closed")))


async def firstByte(
    reactor: Any, system: str, paths: dict[str, str], port: int, authenticator: Any
) -> float:
    got: Deferred[float] = Deferred()
    endpoint = TCP4ClientEndpoint(reactor, HOST, port)
    started = time.monotonic()
    factory = Factory.forProtocol(lambda: _FirstByte(started, got))
    factory.noisy = False
    if system == "dwtrust":
        await authenticator.clientEndpoint(endpoint, f"{HOST}:{port}").connect(factory)
    else:
        options = _common.tlsOptions(
            Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
        )
        await endpoint.connect(TLSMemoryBIOFactory(options, True, factory))
    return await got


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    processes: list[ServerProcess] = []
    try:
        results: dict[str, Any] = {"delayMs": options.delay * 1000}
        _, authenticator = await _common.dwtrustConnector(reactor, paths, 0)
        for system in ("tls", "dwtrust"):
            server = ServerProcess(MODULE, system, json.dumps(paths))
            processes.append(server)
            relayProcess = ServerProcess(
                MODULE, "relay", str(server.port), str(options.delay)
            )
            processes.append(relayProcess)
            # The client pins the server under the address it dials; the relay
            # is another address for the same server.
            for _ in range(5):
                await firstByte(reactor, system, paths, server.port, authenticator)
                await firstByte(
                    reactor, system, paths, relayProcess.port, authenticator
                )
            direct = [
                await firstByte(reactor, system, paths, server.port, authenticator)
                for _ in range(options.direct)
            ]
            delayed = [
                await firstByte(
                    reactor, system, paths, relayProcess.port, authenticator
                )
                for _ in range(options.delayed)
            ]
            results[system] = {
                "directMs": _common.median(direct) * 1000,
                "directP99Ms": _common.percentile(direct, 99) * 1000,
                "delayedMs": _common.median(delayed) * 1000,
                "roundTrips": _common.median(delayed) / (2 * options.delay),
            }
            print(f"  {system}: {results[system]}", file=sys.stderr, flush=True)
        results["addedRoundTrips"] = (
            results["dwtrust"]["roundTrips"] - results["tls"]["roundTrips"]
        )
        _common.emit({"benchmark": "latency", "results": results})
    finally:
        for process in processes:
            process.stop()


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        if argv[1] == "relay":
            react(lambda reactor: relay(reactor, int(argv[2]), float(argv[3])))
        else:
            react(lambda reactor: server(reactor, argv[1], argv[2]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--delay", type=float, default=0.025, help="one-way, seconds")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    options.direct = 30 if options.quick else 200
    options.delayed = 5 if options.quick else 20
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
