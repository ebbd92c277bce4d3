"""
Connection rate: per connection, TCP connect, TLS handshake, authentication
(dwtrust: the handshake and the store lookup), a 1-byte echo through the
application, and close; one at a time, 4 and 64 concurrent.

dwtrust (P-256 identities, and Ed25519) against plain Twisted TLS (mutual
self-signed P-256 certificates, TLS 1.3, no resumption) and foolscap (a fresh
client Tub, a connection, one C{callRemote}, the Tub stopped).  The systems are
measured in interleaved rounds, and each figure is the median of its rounds.

    python -m benchmarks.connections [--quick] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import react

from . import _common
from ._common import Echo, ServerProcess

MODULE = "benchmarks.connections"


def server(reactor: Any, system: str, pathsJSON: str) -> Deferred[None]:
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)

    def ready(port: int, **extra: Any) -> None:
        _common.serveCommands(reactor, {"port": port, **extra}, dict)

    if system in ("dwtrust", "dwtrust-memstore"):
        store = "memory" if system == "dwtrust-memstore" else paths["serverStore"]
        _common.listenDwtrust(
            reactor, paths["server"], store, Factory.forProtocol(Echo)
        ).addCallback(lambda listened: ready(listened[0].getHost().port))
    elif system == "tls":
        port = _common.listenTLS(reactor, paths, Factory.forProtocol(Echo))
        ready(port.getHost().port)
    else:
        _tub, portNumber, furl = _common.listenFoolscap(paths)
        ready(portNumber, furl=furl)
    return finished


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    variants: list[tuple[str, str]] = [
        ("dwtrust", "ecdsa-p256"),
        ("tls", ""),
        ("foolscap", ""),
    ]
    if options.ed25519:
        variants.append(("dwtrust", "ed25519"))
    if options.diagnostic:
        variants.append(("dwtrust-memstore", "ecdsa-p256"))
    servers: dict[str, ServerProcess] = {}
    connectors: dict[str, _common.Connect] = {}
    try:
        for system, algorithm in variants:
            name = f"{system}-{algorithm}" if algorithm else system
            paths = _common.setUp(work, algorithm or "ecdsa-p256")
            process = ServerProcess(MODULE, system, json.dumps(paths))
            servers[name] = process
            if system.startswith("dwtrust"):
                connect, _ = await _common.dwtrustConnector(
                    reactor, paths, process.port, system == "dwtrust-memstore"
                )
            elif system == "tls":
                connect = _common.tlsConnector(reactor, paths, process.port)
            else:
                connect = _common.foolscapConnector(paths, process.info["furl"])
            connectors[name] = connect
            # Warm up: the first connection pins the server, fills caches.
            for _ in range(20):
                await connect()
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            name: {str(c): [] for c in options.concurrency} for name in connectors
        }
        for directory in (options.profile, options.cprofile):
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
        for concurrency in options.concurrency:
            for roundNumber in range(options.rounds):
                for name, connect in connectors.items():
                    profiling = (
                        options.profile
                        and name == "dwtrust-ecdsa-p256"
                        and roundNumber == 0
                    )
                    # cProfile on the server, in a round of its own (its
                    # figures are not counted): tottime per function, to
                    # compare dwtrust's server with plain TLS's.
                    if options.cprofile and name != "foolscap" and roundNumber == 0:
                        servers[name].command("cprofile")
                        counted = await _common.measureRate(
                            connect, concurrency, options.duration, reactor
                        )
                        output = (
                            Path(options.cprofile) / f"server-{name}-c{concurrency}.txt"
                        )
                        servers[name].command(f"uncprofile {output.resolve()}")
                        text = output.read_text()
                        output.write_text(f"connections: {counted['count']}\n" + text)
                    if profiling:
                        servers[name].command("profile")
                        from pyinstrument import Profiler

                        profiler = Profiler(interval=0.0005, async_mode="disabled")
                        profiler.start()
                    measured = await _common.measureRate(
                        connect,
                        concurrency,
                        options.duration,
                        reactor,
                        servers[name].pid,
                    )
                    if profiling:
                        profiler.stop()
                        base = Path(options.profile)
                        (base / f"client-c{concurrency}.txt").write_text(
                            profiler.output_text(unicode=False)
                        )
                        serverProfile = base / f"server-c{concurrency}.txt"
                        servers[name].command(f"unprofile {serverProfile.resolve()}")
                    results[name][str(concurrency)].append(measured)
                    print(
                        f"  {name:20} c={concurrency:<3} round {roundNumber}:"
                        f" {measured['rate']:7.1f}/s (p50 {measured['p50ms']:.2f} ms,"
                        f" failures {measured['failures']}; cpu/conn server"
                        f" {measured['serverCpuMs']:.2f} ms, client"
                        f" {measured['clientCpuMs']:.2f} ms)",
                        file=sys.stderr,
                        flush=True,
                    )
        summary: dict[str, Any] = {}
        for name, byConcurrency in results.items():
            summary[name] = {
                c: {
                    "rate": _common.median([r["rate"] for r in runs]),
                    "p50ms": _common.median([r["p50ms"] for r in runs]),
                    "p99ms": _common.median([r["p99ms"] for r in runs]),
                    "failures": sum(r["failures"] for r in runs),
                    "serverCpuMs": _common.median([r["serverCpuMs"] for r in runs]),
                    "clientCpuMs": _common.median([r["clientCpuMs"] for r in runs]),
                    "rounds": [round(r["rate"], 1) for r in runs],
                }
                for c, runs in byConcurrency.items()
            }
        _common.emit({"benchmark": "connections", "results": summary})
    finally:
        for process in servers.values():
            process.stop()


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        react(lambda reactor: server(reactor, argv[1], argv[2]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 64])
    parser.add_argument(
        "--profile", default=None, help="write pyinstrument profiles here"
    )
    parser.add_argument(
        "--cprofile", default=None, help="write the servers' cProfile tables here"
    )
    parser.add_argument("--no-ed25519", dest="ed25519", action="store_false")
    parser.add_argument(
        "--diagnostic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also dwtrust with its stores in memory (default: not with --quick)",
    )
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    if options.diagnostic is None:
        options.diagnostic = not options.quick
    if options.duration is None:
        options.duration = 2.0 if options.quick else 5.0
    if options.rounds is None:
        options.rounds = 1 if options.quick else 3
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
