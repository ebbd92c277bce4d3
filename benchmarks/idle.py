"""
Idle connections: open N authenticated connections (10,000; 1,000 with
C{--quick}), each of which has echoed one byte through the application, and
keep them open; the server process's resident memory per connection, against
the same over plain TLS 1.3.

    python -m benchmarks.idle [--quick] [--connections N]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from . import _common
from ._common import HOST, Echo, ServerProcess

MODULE = "benchmarks.idle"


def server(reactor: Any, system: str, pathsJSON: str) -> Deferred[None]:
    _common.raiseFileLimit()
    paths = json.loads(pathsJSON)
    factory = Factory.forProtocol(Echo)
    factory.noisy = False

    def stats() -> dict[str, Any]:
        gc.collect()
        return {"open": len(reactor.getReaders())}

    return _common.serveSystem(reactor, system, paths, factory, stats)


class Holder(Protocol):
    """
    Echoes one byte, then stays open.
    """

    def __init__(self, ready: Deferred[Protocol]) -> None:
        self.ready = ready

    def connectionMade(self) -> None:
        self.transport.write(b"x")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.ready.called:
            self.ready.errback(reason or Failure(RuntimeError("closed")))


async def openOne(
    reactor: Any, system: str, paths: dict[str, str], port: int, auth: Any, tls: Any
) -> Protocol:
    ready: Deferred[Protocol] = Deferred()
    factory = Factory.forProtocol(lambda: Holder(ready))
    factory.noisy = False
    endpoint = TCP4ClientEndpoint(reactor, HOST, port)
    if system == "dwtrust":
        await auth.clientEndpoint(endpoint, f"{HOST}:{port}").connect(factory)
    else:
        await endpoint.connect(TLSMemoryBIOFactory(tls, True, factory))
    return await ready


async def collect(opening: Any, opened: list[Protocol], failures: list[str]) -> None:
    try:
        opened.append(await opening)
    except Exception as e:
        failures.append(repr(e))


def startOne(
    opening: Any, opened: list[Protocol], failures: list[str]
) -> Deferred[None]:
    return Deferred.fromCoroutine(collect(opening, opened, failures))


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    limit = _common.raiseFileLimit()
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    tls = _common.tlsOptions(
        Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
    )
    results: dict[str, Any] = {"connections": options.connections, "fileLimit": limit}
    _, auth = await _common.dwtrustConnector(reactor, paths, 0)
    for system in ("tls", "dwtrust"):
        process = ServerProcess(MODULE, system, json.dumps(paths))
        try:
            warm = [
                await openOne(reactor, system, paths, process.port, auth, tls)
                for _ in range(50)
            ]
            for p in warm:
                p.transport.loseConnection()  # type: ignore[union-attr]
            await _common.sleep(reactor, 0.5)
            before = process.command("stats")["rss"]
            semaphore = DeferredSemaphore(64)
            started = time.monotonic()
            opened: list[Protocol] = []
            failures: list[str] = []

            await gatherResults(
                [
                    semaphore.run(
                        startOne,
                        openOne(reactor, system, paths, process.port, auth, tls),
                        opened,
                        failures,
                    )
                    for _ in range(options.connections)
                ]
            )
            elapsed = time.monotonic() - started
            await _common.sleep(reactor, 1.0)
            after = process.command("stats")
            results[system] = {
                "opened": len(opened),
                "failures": len(failures),
                "firstFailure": failures[0] if failures else None,
                "rssBeforeMiB": before / 2**20,
                "rssAfterMiB": after["rss"] / 2**20,
                "bytesPerConnection": (after["rss"] - before) / max(1, len(opened)),
                "openSeconds": elapsed,
            }
            print(f"  {system}: {results[system]}", file=sys.stderr, flush=True)
            for p in opened:
                p.transport.loseConnection()  # type: ignore[union-attr]
            await _common.sleep(reactor, 1.0)
        finally:
            process.stop()
    results["ratio"] = (
        results["dwtrust"]["bytesPerConnection"] / results["tls"]["bytesPerConnection"]
    )
    _common.emit({"benchmark": "idle", "results": results})


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        react(lambda reactor: server(reactor, argv[1], argv[2]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    if options.connections is None:
        options.connections = 1000 if options.quick else 10000
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
