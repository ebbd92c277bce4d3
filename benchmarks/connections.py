"""
Connection rate: per connection, TCP connect, TLS handshake, authentication
(dwtrust: the handshake and the store lookup), a 1-byte echo through the
application, and close; one at a time, 4 and 64 concurrent.

What is measured (client and server in separate processes, one server
process per variant, so that its CPU per connection is its own):

- C{tls-p256} and C{tls-ed25519}: plain Twisted TLS, mutual self-signed
  certificates (P-256, and Ed25519), TLS 1.3, dwtrust's key-exchange groups
  (X25519MLKEM768 first), no resumption: the references.
- C{dwtrust-v1}: dwtrust P-256 identities, the client offering protocol
  version 1 only (C{versions=(1,)}), through C{Authenticator.clientEndpoint}.
- C{dwtrust-v2}: the same, offering version 2 (C{versions=(2, 1)}).
- C{dwtrust-string}: the C{dwtrust:} client endpoint string
  (C{clientFromString}), with its default versions.
- C{dwtrust-v2-ed25519}: Ed25519 identities, version 2 (not with --quick).
- C{foolscap}: a fresh client Tub per connection, one C{callRemote} (not with
  --quick; a reference from before).
- C{dwtrust-v2-memstore}: a diagnostic, both stores in memory (--diagnostic).

Every dwtrust server accepts its default versions; the client chooses.  The
first connections of each variant are checked: the protocol version they
negotiated must be the one the variant is named for, and the TLS version and
key-exchange group are printed.  The variants take turns, round after round;
each figure is the median of its rounds.  The server's CPU (user and system,
from C{/proc}) is read before and after each round.

    python -m benchmarks.connections [--quick] [--versions 1 2] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import react

from . import _common
from ._common import Echo, ServerProcess

MODULE = "benchmarks.connections"
#: The targets for protocol version 2, against plain TLS of the same key type.
RATE_TARGET = 0.9
CPU_TARGET = 1.15


@frozen
class Variant:
    """
    One thing measured.

    @ivar server: C{dwtrust}, C{dwtrust-memstore}, C{tls} or C{foolscap}.
    @ivar client: C{api}, C{string}, C{tls} or C{foolscap}.
    @ivar versions: the versions the dwtrust client offers (C{None}: its
        default).
    @ivar protocol: the dwtrust protocol version it must negotiate.
    @ivar reference: the variant it is compared with.
    """

    name: str
    server: str
    client: str
    algorithm: str = "ecdsa-p256"
    versions: tuple[int, ...] | None = None
    protocol: int | None = None
    reference: str = "tls-p256"


def variants(options: argparse.Namespace) -> list[Variant]:
    v2 = 2 in options.versions
    chosen = [Variant("tls-p256", "tls", "tls")]
    if options.ed25519:
        chosen.append(
            Variant("tls-ed25519", "tls", "tls", "ed25519", reference="tls-ed25519")
        )
    if 1 in options.versions:
        chosen.append(
            Variant(
                "dwtrust-v1",
                "dwtrust",
                "api",
                versions=(1,) if _common.hasVersions() else None,
                protocol=1,
            )
        )
    if v2:
        chosen.append(
            Variant("dwtrust-v2", "dwtrust", "api", versions=(2, 1), protocol=2)
        )
    chosen.append(
        Variant("dwtrust-string", "dwtrust", "string", protocol=2 if v2 else None)
    )
    if v2 and options.ed25519 and not options.quick:
        chosen.append(
            Variant(
                "dwtrust-v2-ed25519",
                "dwtrust",
                "api",
                "ed25519",
                versions=(2, 1),
                protocol=2,
                reference="tls-ed25519",
            )
        )
    if options.foolscap:
        chosen.append(Variant("foolscap", "foolscap", "foolscap"))
    if options.diagnostic:
        chosen.append(
            Variant(
                "dwtrust-v2-memstore" if v2 else "dwtrust-v1-memstore",
                "dwtrust-memstore",
                "api",
                versions=(2, 1) if v2 else None,
                protocol=2 if v2 else 1,
            )
        )
    return chosen


def server(reactor: Any, system: str, algorithm: str, pathsJSON: str) -> Deferred[None]:
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)

    def ready(port: int, **extra: Any) -> None:
        _common.serveCommands(reactor, {"port": port, **extra}, dict)

    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    if system in ("dwtrust", "dwtrust-memstore"):
        store = "memory" if system == "dwtrust-memstore" else paths["serverStore"]
        _common.listenDwtrust(reactor, paths["server"], store, factory).addCallback(
            lambda listened: ready(listened[0].getHost().port)
        )
    elif system == "tls":
        port = _common.listenTLS(reactor, paths, factory, algorithm)
        ready(port.getHost().port)
    else:
        _tub, portNumber, furl = _common.listenFoolscap(paths)
        ready(portNumber, furl=furl)
    return finished


async def connector(
    reactor: Any,
    variant: Variant,
    paths: dict[str, str],
    process: ServerProcess,
    seen: list[dict[str, Any]],
) -> _common.Connect:
    if variant.client == "api":
        connect, _ = await _common.dwtrustConnector(
            reactor,
            paths,
            process.port,
            memory=variant.server == "dwtrust-memstore",
            versions=variant.versions,
            seen=seen,
        )
        return connect
    if variant.client == "string":
        return _common.stringConnector(reactor, paths, process.port, seen)
    if variant.client == "tls":
        return _common.tlsConnector(
            reactor, paths, process.port, variant.algorithm, seen
        )
    return _common.foolscapConnector(paths, process.info["furl"])


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    chosen = variants(options)
    for variant in chosen:
        _common.requireVersions(variant.versions, MODULE)
    servers: dict[str, ServerProcess] = {}
    connectors: dict[str, _common.Connect] = {}
    try:
        for variant in chosen:
            paths = _common.setUp(work, variant.algorithm)
            process = ServerProcess(
                MODULE, variant.server, variant.algorithm, json.dumps(paths)
            )
            servers[variant.name] = process
            seen: list[dict[str, Any]] = []
            connect = await connector(reactor, variant, paths, process, seen)
            connectors[variant.name] = connect
            # Warm up: the first connection pins the server, fills caches.
            for _ in range(20):
                await connect()
            if variant.client != "foolscap":
                _common.checkProtocol(MODULE, variant.name, variant.protocol, seen)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            name: {str(c): [] for c in options.concurrency} for name in connectors
        }
        for directory in (options.profile, options.cprofile):
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
        profiled = "dwtrust-v2" if 2 in options.versions else "dwtrust-v1"
        for concurrency in options.concurrency:
            for roundNumber in range(options.rounds):
                for name, connect in connectors.items():
                    profiling = (
                        options.profile and name == profiled and roundNumber == 0
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
                        (base / f"client-{name}-c{concurrency}.txt").write_text(
                            profiler.output_text(unicode=False)
                        )
                        serverProfile = base / f"server-{name}-c{concurrency}.txt"
                        servers[name].command(f"unprofile {serverProfile.resolve()}")
                    results[name][str(concurrency)].append(measured)
                    print(
                        f"  {name:20} c={concurrency:<3} round {roundNumber}:"
                        f" {measured['rate']:7.1f}/s (p50 {measured['p50ms']:.2f} ms,"
                        f" failures {measured['failures']}; cpu/conn server"
                        f" {measured['serverCpuMs']:.2f} ms, client"
                        f" {measured['clientCpuMs']:.2f} ms)"
                        + (
                            f" first failure: {measured['firstFailure']}"
                            if measured["failures"]
                            else ""
                        ),
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
        references = {v.name: v.reference for v in chosen}
        result = {
            "benchmark": "connections",
            "results": summary,
            "references": references,
            "duration": options.duration,
            "rounds": options.rounds,
        }
        print(report(result), file=sys.stderr, flush=True)
        _common.emit(result)
    finally:
        for process in servers.values():
            process.stop()


def report(result: dict[str, Any]) -> str:
    """
    The figures as a reStructuredText table: per concurrency and variant, the
    rate and the server's CPU per connection, each with its ratio to the plain
    TLS reference of the same key type, and for version 2 whether the targets
    are met.
    """
    r = result["results"]
    references: dict[str, str] = result.get("references", {})
    rows = []
    concurrencies = list(next(iter(r.values())))
    for c in concurrencies:
        for name, byConcurrency in r.items():
            m = byConcurrency[c]
            reference = references.get(name, "tls-p256")
            base = r.get(reference, {}).get(c)
            rate = cpu = target = "-"
            if base and name != reference:
                rateRatio = m["rate"] / base["rate"]
                cpuRatio = m["serverCpuMs"] / base["serverCpuMs"]
                rate = f"{rateRatio:.2f}x"
                cpu = f"{cpuRatio:.2f}x"
                if name.startswith("dwtrust-v2") and "memstore" not in name:
                    target = (
                        f"rate {_common.met(rateRatio >= RATE_TARGET)},"
                        f" CPU {_common.met(cpuRatio <= CPU_TARGET)}"
                    )
            rows.append(
                [
                    c,
                    name,
                    f"{m['rate']:.0f}",
                    rate,
                    f"{m['p50ms']:.1f}",
                    f"{m['serverCpuMs']:.2f}",
                    cpu,
                    f"{m['clientCpuMs']:.2f}",
                    str(m["failures"]),
                    target,
                ]
            )
    text = _common.table(
        [
            "conc.",
            "variant",
            "conn/s",
            "vs TLS",
            "p50 ms",
            "server CPU ms/conn",
            "vs TLS",
            "client CPU ms/conn",
            "failures",
            f"v2 target (>={RATE_TARGET}x, CPU <={CPU_TARGET}x)",
        ],
        rows,
    )
    if "foolscap" in r:
        compared = next((n for n in ("dwtrust-v2", "dwtrust-v1") if n in r), None)
        if compared:
            text += f"\n\n{compared} / foolscap: " + ", ".join(
                f"{r[compared][c]['rate'] / r['foolscap'][c]['rate']:.1f}x"
                f" ({c} concurrent)"
                for c in concurrencies
            )
    return text


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        react(lambda reactor: server(reactor, argv[1], argv[2], argv[3]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 64])
    parser.add_argument(
        "--versions",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1, 2],
        help="the dwtrust protocol versions measured (default: 1 and 2)",
    )
    parser.add_argument(
        "--profile", default=None, help="write pyinstrument profiles here"
    )
    parser.add_argument(
        "--cprofile", default=None, help="write the servers' cProfile tables here"
    )
    parser.add_argument(
        "--ed25519",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the Ed25519 TLS reference (and dwtrust v2 with Ed25519 unless --quick)",
    )
    parser.add_argument(
        "--foolscap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="foolscap as a further reference (default: not with --quick)",
    )
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
    if options.foolscap is None:
        options.foolscap = not options.quick
    if options.duration is None:
        options.duration = 1.5 if options.quick else 5.0
    if options.rounds is None:
        options.rounds = 1 if options.quick else 3
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
