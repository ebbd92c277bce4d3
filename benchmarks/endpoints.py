"""
The connection rate of the C{dwtrust:} client endpoint string, side by side
in one run with the same client through L{Authenticator.clientEndpoint} (the
API) and with plain Twisted TLS, against servers in processes of their own
(those of L{benchmarks.connections}): new connection, handshake, a 1-byte
echo, close; one at a time and 4 at a time, the systems taking turns.

    python -m benchmarks.endpoints [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from . import _common
from ._common import HOST, Connect, ServerProcess


def stringConnector(reactor: Any, paths: dict[str, str], port: int) -> Connect:
    """
    A dwtrust client through C{clientFromString}, parsed once, as a program
    that takes an endpoint description does.
    """
    from twisted.internet.endpoints import clientFromString

    endpoint = clientFromString(
        reactor,
        f"dwtrust:tcp:host={HOST}:port={port}:identity={paths['client']}"
        f":store={paths['clientStore']}",
    )

    def connect() -> Deferred[None]:
        done: Deferred[None] = Deferred()
        endpoint.connect(_common.oneByteFactory(done)).addErrback(done.errback)
        return done

    return connect


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    dwtrust = ServerProcess(
        "benchmarks.connections", "dwtrust", "ecdsa-p256", json.dumps(paths)
    )
    tls = ServerProcess(
        "benchmarks.connections", "tls", "ecdsa-p256", json.dumps(paths)
    )
    try:
        api, authenticator = await _common.dwtrustConnector(
            reactor, paths, dwtrust.port
        )
        systems: dict[str, tuple[Connect, ServerProcess]] = {
            "tls": (_common.tlsConnector(reactor, paths, tls.port), tls),
            "api": (api, dwtrust),
            "string": (stringConnector(reactor, paths, dwtrust.port), dwtrust),
        }
        for connect, _ in systems.values():
            for _ in range(10):
                await connect()
        results: dict[str, Any] = {}
        for concurrency in (1, 4):
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            for _ in range(options.rounds):
                for name, (connect, process) in systems.items():
                    rounds[name].append(
                        await _common.measureRate(
                            connect, concurrency, options.duration, reactor, process.pid
                        )
                    )
            results[str(concurrency)] = {
                name: {
                    "rate": _common.median([r["rate"] for r in measured]),
                    "clientCpuMs": _common.median([r["clientCpuMs"] for r in measured]),
                    "failures": sum(r["failures"] for r in measured),
                }
                for name, measured in rounds.items()
            }
            line = results[str(concurrency)]
            plain = line["tls"]["rate"]
            print(
                f"  {concurrency} at a time: TLS {plain:.0f}/s, API"
                f" {line['api']['rate']:.0f}/s ({line['api']['rate'] / plain:.2f}x),"
                f" endpoint string {line['string']['rate']:.0f}/s"
                f" ({line['string']['rate'] / plain:.2f}x); client CPU ms/conn"
                f" API {line['api']['clientCpuMs']:.2f},"
                f" string {line['string']['clientCpuMs']:.2f}",
                file=sys.stderr,
                flush=True,
            )
        await authenticator.close()
    finally:
        dwtrust.stop()
        tls.stop()
    _common.emit({"benchmark": "endpoints", "results": results})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.endpoints")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    options.duration = 2.0 if options.quick else 5.0
    options.rounds = 1 if options.quick else 3
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
