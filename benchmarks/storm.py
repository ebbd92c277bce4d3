"""
Approval storm: 1,000 unknown clients (each with a key of its own) connect at
once to a dwtrust server whose approver is the owners' (each is recorded as a
pending request and held, waiting for an owner), while a known client keeps
connecting one connection after another.

Three processes: the server (which measures its reactor's stalls with a call
every 10 ms, and its peak memory), the storm's clients, and the known client
(the driver).  Reported: the server's largest stall and its 99th percentile,
its peak RSS, how long until all the requests were pending, and the known
client's connection times before and during the storm.

    python -m benchmarks.storm [--quick] [--clients N] [--handshakes N]
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
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.python.failure import Failure

from . import _common
from ._common import HOST, Echo, ServerProcess

MODULE = "benchmarks.storm"
#: Seconds allowed for a handshake (the default is 10): a thousand handshakes
#: at once take longer than that on a small machine, and the point here is
#: what holding them all costs, not how many time out.
STORM_TIMEOUT = 60.0


class CountingApprover:
    """
    Passes requests on to the owners' approver, counting them.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests = 0

    def requestApproval(self, request: Any) -> Any:
        self.requests += 1
        return self.inner.requestApproval(request)


def server(
    reactor: Any, pathsJSON: str, clients: str, handshakes: str = "0"
) -> Deferred[None]:
    from dwtrust import Limits
    from dwtrust.approval._owners import OwnersApprover
    from dwtrust.control import ControlBus

    _common.raiseFileLimit()
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    counting: list[CountingApprover] = []

    def approver(store: Any) -> CountingApprover:
        cap = 2 * int(clients)
        counting.append(
            CountingApprover(
                OwnersApprover(
                    store, ControlBus(), maxPending=cap, maxPendingPerSource=cap
                )
            )
        )
        return counting[0]

    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    _common.listenDwtrust(
        reactor,
        paths["server"],
        paths["serverStore"],
        factory,
        approver=approver,
        timeout=STORM_TIMEOUT,
        # The storm comes from one address (loopback) but stands for a
        # thousand: the caps per source and in total are raised to let it
        # all in, so that what is measured is the admission of TLS
        # handshakes (--handshakes, 0 for the default).
        limits=Limits(
            maxUntrusted=2 * int(clients),
            maxUntrustedPerSource=2 * int(clients),
            **({"maxTLSHandshakes": int(handshakes)} if int(handshakes) else {}),
        ),
    ).addCallback(
        lambda listened: _common.serveCommands(
            reactor,
            {"port": listened[0].getHost().port},
            lambda: {"requests": counting[0].requests},
        )
    )
    return finished


class _Waiting(Protocol):
    """
    An unknown client's application: connected once the server has proved
    itself; then it waits, as the server holds it.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def connectionMade(self) -> None:
        self.counts["proved"] += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        code = getattr(getattr(reason, "value", None), "code", None)
        key = f"closed:{getattr(code, 'value', code)}"
        self.counts[key] = self.counts.get(key, 0) + 1


def stormer(reactor: Any, port: str, clients: str) -> Deferred[None]:
    """
    The storm's clients, in their own process: keys made in advance, then on
    C{go}, every connection at once.
    """
    from dwtrust import Authenticator, Identity, PinningPolicy
    from dwtrust.testing import MemoryTrustStore

    _common.raiseFileLimit()
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    counts = {"proved": 0, "failed": 0}
    authenticators = [
        Authenticator(
            Identity.generate("storm", f"client{i}", "ecdsa-p256"),
            None,
            PinningPolicy(MemoryTrustStore()),
            reactor,
            timeout=STORM_TIMEOUT,
            decisionTimeout=120.0,
        )
        for i in range(int(clients))
    ]
    factory = Factory.forProtocol(lambda: _Waiting(counts))
    factory.noisy = False

    def failed(reason: Failure) -> None:
        counts["failed"] += 1
        counts.setdefault("firstFailure", repr(reason.value))  # type: ignore[arg-type]

    class Commands(Protocol):
        def dataReceived(self, data: bytes) -> None:
            for line in data.decode().split():
                if line == "go":
                    for authenticator in authenticators:
                        endpoint = TCP4ClientEndpoint(reactor, HOST, int(port))
                        authenticator.clientEndpoint(
                            endpoint, f"{HOST}:{port}"
                        ).connect(factory).addErrback(failed)
                    print(json.dumps({}), flush=True)
                elif line == "stats":
                    print(json.dumps(counts), flush=True)
                elif line == "quit":
                    print(json.dumps({}), flush=True)
                    reactor.callLater(0, reactor.stop)

        def connectionLost(self, reason: Failure | None = None) -> None:
            if reactor.running:
                reactor.stop()

    from twisted.internet.stdio import StandardIO

    print(json.dumps({"ready": len(authenticators)}), flush=True)
    StandardIO(Commands(), reactor=reactor)
    return finished


async def knownLoop(
    connect: _common.Connect,
    until: list[bool],
    times: list[float],
    failures: list[str] | None = None,
) -> None:
    while not until:
        started = time.monotonic()
        try:
            await connect()
        except Exception as e:
            if failures is None:
                raise
            failures.append(repr(e))
            continue
        times.append(time.monotonic() - started)


def summarise(
    times: list[float], seconds: float, failures: list[str] | None = None
) -> dict[str, float]:
    failed = len(failures or ())
    return {
        "successRate": len(times) / (len(times) + failed) if times else 0.0,
        "rate": len(times) / seconds if seconds else 0.0,
        "p50Ms": _common.percentile(times, 50) * 1000,
        "p99Ms": _common.percentile(times, 99) * 1000,
        "maxMs": max(times, default=float("nan")) * 1000,
    }


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    _common.raiseFileLimit()
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    # A fresh store: the storm's requests are recorded in it.
    storm = dict(paths, serverStore=str(work / f"storm-{time.time_ns()}.sqlite3"))
    from twisted.python.filepath import FilePath

    from dwtrust import Identity, PeerIdentity

    serverIdentity = Identity.load(FilePath(paths["server"]))
    client = Identity.load(FilePath(paths["client"]))
    _common.approve(
        storm["serverStore"],
        serverIdentity,
        [PeerIdentity(client.org, client.service, client.publicKey)],
    )
    serverProcess = ServerProcess(
        MODULE, json.dumps(storm), str(options.clients), str(options.handshakes)
    )
    stormProcess = ServerProcess(
        MODULE, "stormer", str(serverProcess.port), str(options.clients)
    )
    try:
        connect, auth = await _common.dwtrustConnector(
            reactor, storm, serverProcess.port
        )
        for _ in range(20):
            await connect()
        # Before the storm.
        serverProcess.command("reset")
        calm: list[float] = []
        stop: list[bool] = []
        loop = Deferred.fromCoroutine(knownLoop(connect, stop, calm))
        await _common.sleep(reactor, options.calm)
        stop.append(True)
        await loop
        calmStats = serverProcess.command("stats")
        # The storm.
        serverProcess.command("reset")
        during: list[float] = []
        duringFailures: list[str] = []
        stop = []
        loop = Deferred.fromCoroutine(knownLoop(connect, stop, during, duringFailures))
        if options.profile:
            serverProcess.command("profile")
        started = time.monotonic()
        await stormProcess.commandInThread("go")
        allPending = float("nan")
        deadline = started + options.limit
        while time.monotonic() < deadline:
            await _common.sleep(reactor, 0.25)
            stats = await serverProcess.commandInThread("stats")
            if stats["requests"] >= options.clients:
                allPending = time.monotonic() - started
                break
        stormSeconds = time.monotonic() - started
        await _common.sleep(reactor, options.calm)
        stop.append(True)
        await loop
        stormStats = await serverProcess.commandInThread("stats")
        if options.profile:
            serverProcess.command(f"unprofile {Path(options.profile).resolve()}")
        clients = await stormProcess.commandInThread("stats")
        results = {
            "clients": options.clients,
            "secondsUntilAllPending": allPending,
            "pendingRequests": stormStats["requests"],
            "stormClients": clients,
            "calm": {
                "maxLagMs": calmStats["maxLag"] * 1000,
                "p99LagMs": calmStats["p99Lag"] * 1000,
                "rssMiB": calmStats["rss"] / 2**20,
                "known": summarise(calm, options.calm),
            },
            "storm": {
                "maxLagMs": stormStats["maxLag"] * 1000,
                "p99LagMs": stormStats["p99Lag"] * 1000,
                "rssMiB": stormStats["rss"] / 2**20,
                "peakRssMiB": stormStats["peakRss"] / 2**20,
                "known": summarise(during, stormSeconds + options.calm, duringFailures),
            },
        }
        print(f"  {results}", file=sys.stderr, flush=True)
        _common.emit({"benchmark": "storm", "results": results})
        await auth.close()
    finally:
        stormProcess.stop()
        serverProcess.stop()


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        if argv[1] == "stormer":
            react(lambda reactor: stormer(reactor, argv[2], argv[3]))
        else:
            react(lambda reactor: server(reactor, *argv[1:4]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument(
        "--handshakes",
        type=int,
        default=0,
        help="TLS handshakes in progress at most (0: the default)",
    )
    parser.add_argument("--profile", default=None, help="the server's profile file")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    options.calm = 2.0 if options.quick else 4.0
    options.limit = 60.0
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
