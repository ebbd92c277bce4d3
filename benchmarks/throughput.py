"""
Throughput after hand-off: the server's application sends 1 GiB (256 MiB with
C{--quick}) through its transport, as a pull producer of 64 KiB chunks; the
client's application counts it.  Timed at the client, from the first byte to
the last, so that the handshakes are not counted.  dwtrust's wrapped
application against the same application over plain TLS 1.3.

    python -m benchmarks.throughput [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from . import _common
from ._common import HOST, ServerProcess

MODULE = "benchmarks.throughput"
CHUNK = b"\xa5" * 65536


@implementer(IPullProducer)
class Sender(Protocol):
    """
    Sends C{total} bytes once connected.
    """

    def __init__(self, total: int) -> None:
        self.remaining = total

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if self.remaining <= 0:
            self.transport.unregisterProducer()  # type: ignore[union-attr]
            return
        chunk = CHUNK if self.remaining >= len(CHUNK) else CHUNK[: self.remaining]
        self.remaining -= len(chunk)
        self.transport.write(chunk)  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.remaining = 0


def server(reactor: Any, system: str, pathsJSON: str, total: str) -> Deferred[None]:
    paths = json.loads(pathsJSON)
    factory = Factory.forProtocol(lambda: Sender(int(total)))
    factory.noisy = False
    return _common.serveSystem(reactor, system, paths, factory)


class Counter(Protocol):
    def __init__(self, total: int, done: Deferred[float]) -> None:
        self.total = total
        self.received = 0
        self.first = 0.0
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        if not self.received:
            self.first = time.monotonic()
        self.received += len(data)
        if self.received >= self.total and not self.done.called:
            self.done.callback(time.monotonic() - self.first)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.errback(reason or Failure(RuntimeError("closed early")))


async def receive(
    reactor: Any, system: str, paths: dict[str, str], port: int, total: int, auth: Any
) -> float:
    done: Deferred[float] = Deferred()
    factory = Factory.forProtocol(lambda: Counter(total, done))
    factory.noisy = False
    endpoint = TCP4ClientEndpoint(reactor, HOST, port)
    if system == "dwtrust":
        await auth.clientEndpoint(endpoint, f"{HOST}:{port}").connect(factory)
    else:
        options = _common.tlsOptions(
            Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
        )
        await endpoint.connect(TLSMemoryBIOFactory(options, True, factory))
    return await done


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    total = options.mebibytes * 1024 * 1024
    servers: dict[str, ServerProcess] = {}
    try:
        _, auth = await _common.dwtrustConnector(reactor, paths, 0)
        for system in ("dwtrust", "tls"):
            servers[system] = ServerProcess(
                MODULE, system, json.dumps(paths), str(total)
            )
        rates: dict[str, list[float]] = {"dwtrust": [], "tls": []}
        for _ in range(options.rounds):
            for system, process in servers.items():
                seconds = await receive(
                    reactor, system, paths, process.port, total, auth
                )
                rates[system].append(total / seconds / 1024 / 1024)
                print(
                    f"  {system}: {rates[system][-1]:.0f} MiB/s",
                    file=sys.stderr,
                    flush=True,
                )
        results = {
            "mebibytes": options.mebibytes,
            **{
                system: {
                    "mibPerSecond": _common.median(values),
                    "rounds": [round(v) for v in values],
                }
                for system, values in rates.items()
            },
        }
        results["ratio"] = (
            results["dwtrust"]["mibPerSecond"] / results["tls"]["mibPerSecond"]
        )
        _common.emit({"benchmark": "throughput", "results": results})
    finally:
        for process in servers.values():
            process.stop()


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        react(lambda reactor: server(reactor, argv[1], argv[2], argv[3]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    options.mebibytes = 256 if options.quick else 1024
    options.rounds = 1 if options.quick else 5
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
