"""
Latency to the first application byte, in both directions, for plain TLS 1.3
(mutual P-256 certificates, the same groups as dwtrust), dwtrust protocol
version 1, version 2 with a pinned server, and version 2 on first contact
(the server not pinned yet: the client waits for the server's proof).

Three times, each from the client's TCP connect:

- I{client's byte at the server}: the client's application writes one byte
  as soon as it is connected; the time until the server's application
  receives it (the server stamps it with C{time.monotonic()}, the same clock
  in every process of the machine, and sends the stamp back);
- I{response at the client}: until that reply reaches the client's
  application;
- I{server's byte at the client}: against a server whose application writes
  one byte as soon as it is connected (and a client that writes nothing),
  until the client's application receives it.

Measured directly on loopback (milliseconds), and through a relay, in a
process of its own, that delays every chunk by D in each direction, so that
the time divided by 2D counts the round trips.  The relay accepts the TCP
connection itself at once, so the count starts after TCP's own round trip,
which every system pays alike.  The first connections of each dwtrust
variant are checked to have negotiated its protocol version.

    python -m benchmarks.latency [--quick] [--versions 1 2] [--delay 0.025]
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import struct
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
#: The name the client pins the server under, whichever port it dials.
PIN = "latency-server"
#: The three times measured, and how the tables name them.
MEASURES = {
    "clientByte": "client's byte at server",
    "response": "response at client",
    "serverByte": "server's byte at client",
}
#: Version 2 (pinned) meets its target when it adds less than this many
#: round trips to plain TLS 1.3 (the rest is CPU, not a flight).
ADDED_TARGET = 0.5


# --- The server's applications ---------------------------------------------------


class Greeter(Protocol):
    """
    Speaks first: one byte as soon as it is connected.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"!")  # type: ignore[union-attr]


class Stamper(Protocol):
    """
    Answers the client's first byte with the time it arrived, as a
    big-endian double of C{time.monotonic()}.
    """

    answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(struct.pack("!d", time.monotonic()))  # type: ignore[union-attr]


def server(reactor: Any, system: str, pathsJSON: str) -> Deferred[None]:
    """
    Serve a L{Stamper} and a L{Greeter}, each on a port of its own, with
    C{system} (C{tls}, or C{dwtrust} accepting its default versions).
    """
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    factories: dict[str, Any] = {
        "clientByte": Factory.forProtocol(Stamper),
        "serverByte": Factory.forProtocol(Greeter),
    }
    for factory in factories.values():
        factory.noisy = False

    def ready(ports: dict[str, int]) -> None:
        _common.serveCommands(reactor, {"ports": ports}, dict)

    if system == "tls":
        ready(
            {
                name: _common.listenTLS(reactor, paths, factory).getHost().port
                for name, factory in factories.items()
            }
        )
    else:

        def listened(result: tuple[Any, Any]) -> None:
            port, authenticator = result
            second = reactor.listenTCP(
                0,
                authenticator.wrapServerFactory(factories["serverByte"]),
                interface=HOST,
            )
            ready(
                {"clientByte": port.getHost().port, "serverByte": second.getHost().port}
            )

        _common.listenDwtrust(
            reactor, paths["server"], paths["serverStore"], factories["clientByte"]
        ).addCallback(listened)
    return finished


# --- The delaying relay ------------------------------------------------------


class _Delayed:
    """
    Delivers chunks to C{target.write} C{delay} seconds after they arrive,
    in order (by the reactor's clock), and closes C{target} once told to and
    everything is delivered.
    """

    def __init__(self, reactor: Any, delay: float) -> None:
        self._reactor = reactor
        self._delay = delay
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._call: Any = None
        self.target: Any = None
        self.closing = False

    def push(self, data: bytes) -> None:
        self._queue.append((self._reactor.seconds() + self._delay, data))
        self._schedule()

    def close(self) -> None:
        self.closing = True
        self._schedule()

    def _schedule(self) -> None:
        if self._call is not None or self.target is None:
            return
        if self._queue:
            wait = max(0.0, self._queue[0][0] - self._reactor.seconds())
            self._call = self._reactor.callLater(wait, self._flush)
        elif self.closing:
            self.target.loseConnection()

    def _flush(self) -> None:
        self._call = None
        now = self._reactor.seconds()
        while self._queue and self._queue[0][0] <= now:
            self.target.write(self._queue.popleft()[1])
        self._schedule()

    def attach(self, target: Any) -> None:
        self.target = target
        self._schedule()


def _noDelay(transport: Any) -> None:
    """
    The relay is the measuring instrument: it must not hold small segments
    back (Nagle) on its own sockets.
    """
    handle = getattr(transport, "socket", None)
    if handle is not None:
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _RelaySide(Protocol):
    def __init__(self, outbound: _Delayed, inbound: _Delayed) -> None:
        self.outbound = outbound  # what we receive goes out this way
        self.inbound = inbound  # what the other side receives comes to us

    def connectionMade(self) -> None:
        _noDelay(self.transport)
        self.inbound.attach(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.outbound.push(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.outbound.close()


def relay(reactor: Any, delay: float, upstreams: list[int]) -> Deferred[None]:
    """
    For each upstream port, a port that relays to it with C{delay} seconds
    each way; announces them in the same order.
    """
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)

    def relayTo(upstream: int) -> Any:
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
        return reactor.listenTCP(0, factory, interface=HOST)

    ports = [relayTo(upstream).getHost().port for upstream in upstreams]
    _common.serveCommands(reactor, {"ports": ports}, dict)
    return finished


# --- The client ----------------------------------------------------------------


class _Timed(Protocol):
    """
    The client's application.  With C{speak}, it writes one byte when
    connected and waits for the server's stamp (8 bytes), then fires C{got}
    with (stamp - started, now - started); without, it fires with (now -
    started, now - started) at the first byte the server sends.
    """

    def __init__(
        self,
        started: float,
        speak: bool,
        got: Deferred[tuple[float, float]],
        seen: list[dict[str, Any]],
    ) -> None:
        self.started = started
        self.speak = speak
        self.got = got
        self.seen = seen
        self.buffer = b""

    def connectionMade(self) -> None:
        if self.speak:
            self.transport.write(b"?")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        if self.got.called or (self.speak and len(self.buffer) < 8):
            return
        if len(self.seen) < _common.PROBES:
            self.seen.append(_common.describe(self.transport))
        stamp = struct.unpack("!d", self.buffer[:8])[0] if self.speak else now
        self.got.callback((stamp - self.started, now - self.started))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.got.called:
            self.got.errback(reason or Failure(RuntimeError("closed")))


class Client:
    """
    Dials one system: C{tls}, C{dwtrust-v1}, C{dwtrust-v2} (pinned) or
    C{dwtrust-v2-first} (a fresh pin store per connection).
    """

    def __init__(
        self, reactor: Any, system: str, paths: dict[str, str], authenticator: Any
    ) -> None:
        self.reactor = reactor
        self.system = system
        self.paths = paths
        self.seen: list[dict[str, Any]] = []
        self.authenticator = authenticator
        if system == "tls":
            serverPEM, clientPEM = _common.tlsPEMs(paths)
            self.options = _common.tlsOptions(
                Path(clientPEM).read_bytes(), Path(serverPEM).read_bytes()
            )
        elif system == "dwtrust-v1" and _common.hasVersions():
            import attrs

            self.authenticator = attrs.evolve(authenticator, versions=(1,))
        elif system.startswith("dwtrust-v2"):
            import attrs

            self.authenticator = attrs.evolve(authenticator, versions=(2, 1))

    def _fresh(self) -> Any:
        """
        A client that has pinned nothing (first contact).
        """
        from dwtrust import Authenticator, PinningPolicy
        from dwtrust.testing import MemoryTrustStore

        return Authenticator(
            self.authenticator.identity,
            None,
            PinningPolicy(MemoryTrustStore()),
            self.reactor,
            versions=(2, 1),
        )

    async def once(self, port: int, speak: bool) -> tuple[float, float]:
        got: Deferred[tuple[float, float]] = Deferred()
        endpoint = TCP4ClientEndpoint(self.reactor, HOST, port)
        started = time.monotonic()
        factory = Factory.forProtocol(lambda: _Timed(started, speak, got, self.seen))
        factory.noisy = False
        if self.system == "tls":
            await endpoint.connect(TLSMemoryBIOFactory(self.options, True, factory))
        else:
            authenticator = (
                self._fresh()
                if self.system == "dwtrust-v2-first"
                else self.authenticator
            )
            await authenticator.clientEndpoint(endpoint, PIN).connect(factory)
        return await got


def figures(direct: list[float], relayed: list[float], delay: float) -> dict[str, Any]:
    return {
        "directMs": _common.median(direct) * 1000,
        "directP99Ms": _common.percentile(direct, 99) * 1000,
        "relayedMs": _common.median(relayed) * 1000,
        "roundTrips": _common.median(relayed) / (2 * delay),
    }


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    systems = ["tls"]
    if 1 in options.versions:
        systems.append("dwtrust-v1")
    if 2 in options.versions:
        _common.requireVersions((2, 1), MODULE)
        systems += ["dwtrust-v2", "dwtrust-v2-first"]
    expected = {"dwtrust-v1": 1, "dwtrust-v2": 2, "dwtrust-v2-first": 2}
    processes: list[ServerProcess] = []
    try:
        servers = {}
        for system in ("tls", "dwtrust"):
            process = ServerProcess(MODULE, system, json.dumps(paths))
            processes.append(process)
            servers[system] = process.info["ports"]
        upstreams = [
            servers[s][m] for s in servers for m in ("clientByte", "serverByte")
        ]
        relayProcess = ServerProcess(
            MODULE, "relay", str(options.delay), *map(str, upstreams)
        )
        processes.append(relayProcess)
        relayed = iter(relayProcess.info["ports"])
        relays = {
            s: {m: next(relayed) for m in ("clientByte", "serverByte")} for s in servers
        }
        _, authenticator = await _common.dwtrustConnector(reactor, paths, 0)
        results: dict[str, Any] = {"delayMs": options.delay * 1000, "systems": {}}
        for system in systems:
            side = "tls" if system == "tls" else "dwtrust"
            client = Client(reactor, system, paths, authenticator)
            # Warm up (and pin the server under PIN).
            for _ in range(3):
                for port in (*servers[side].values(), *relays[side].values()):
                    await client.once(
                        port,
                        port
                        in (servers[side]["clientByte"], relays[side]["clientByte"]),
                    )
            if system in expected:
                _common.checkProtocol(MODULE, system, expected[system], client.seen)
            times: dict[str, dict[str, list[float]]] = {
                m: {"direct": [], "relayed": []} for m in MEASURES
            }
            for where, ports, count in (
                ("direct", servers[side], options.direct),
                ("relayed", relays[side], options.delayed),
            ):
                for _ in range(count):
                    atServer, response = await client.once(ports["clientByte"], True)
                    times["clientByte"][where].append(atServer)
                    times["response"][where].append(response)
                    _, serverByte = await client.once(ports["serverByte"], False)
                    times["serverByte"][where].append(serverByte)
            results["systems"][system] = {
                m: figures(t["direct"], t["relayed"], options.delay)
                for m, t in times.items()
            }
            print(
                f"  {system}: {results['systems'][system]}", file=sys.stderr, flush=True
            )
        result = {"benchmark": "latency", "results": results}
        print(report(result), file=sys.stderr, flush=True)
        _common.emit(result)
        await authenticator.close()
    finally:
        for process in processes:
            process.stop()


def report(result: dict[str, Any]) -> str:
    """
    The figures as reStructuredText tables: round trips side by side, then
    the milliseconds.
    """
    r = result["results"]
    systems: dict[str, Any] = r["systems"]
    tls = systems["tls"]
    rows = []
    for name, figures in systems.items():
        row = [name]
        for measure in MEASURES:
            added = figures[measure]["roundTrips"] - tls[measure]["roundTrips"]
            row.append(
                f"{figures[measure]['roundTrips']:.2f}"
                + ("" if name == "tls" else f" ({added:+.2f})")
            )
        if name == "dwtrust-v2":
            worst = max(
                figures[m]["roundTrips"] - tls[m]["roundTrips"] for m in MEASURES
            )
            row.append(f"{_common.met(worst < ADDED_TARGET)} (worst {worst:+.2f})")
        else:
            row.append("-")
        rows.append(row)
    out = [
        f"Round trips to the first byte (relay {r['delayMs']:.0f} ms each way;"
        " in brackets: added to plain TLS 1.3)",
        "",
        _common.table(
            ["system", *MEASURES.values(), f"v2 target (< {ADDED_TARGET} added)"],
            rows,
        ),
        "",
        "Milliseconds (loopback p50 / p99, relayed median)",
        "",
        _common.table(
            ["system", *MEASURES.values()],
            [
                [
                    name,
                    *(
                        f"{f[m]['directMs']:.2f} / {f[m]['directP99Ms']:.2f}"
                        f" / {f[m]['relayedMs']:.0f}"
                        for m in MEASURES
                    ),
                ]
                for name, f in systems.items()
            ],
        ),
    ]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        if argv[1] == "relay":
            react(
                lambda reactor: relay(
                    reactor, float(argv[2]), [int(p) for p in argv[3:]]
                )
            )
        else:
            react(lambda reactor: server(reactor, argv[1], argv[2]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--delay", type=float, default=0.025, help="one-way, seconds")
    parser.add_argument(
        "--versions",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1, 2],
        help="the dwtrust protocol versions measured (default: 1 and 2)",
    )
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    options.direct = 20 if options.quick else 100
    options.delayed = 5 if options.quick else 20
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
