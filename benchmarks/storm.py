"""
Approval storm: 1,000 unknown clients (each with a key of its own) connect at
once to a dwtrust server whose approver is the owners' (each is recorded as a
pending request and held, waiting for an owner), while a known client keeps
connecting one connection after another.

Three processes: the server (which measures its reactor's stalls with a call
every 10 ms, and its peak memory), the storm's clients (from 127.0.1.1, a
source other than the known client's, as a storm from elsewhere would be;
--source to change), and the known client (the driver, from 127.0.0.1).
Reported: the server's largest stall and its 99th percentile, its peak RSS,
how long until all the requests were pending, and the known client's
connection times before and during the storm.

The reference, in the same run: the same number of clients doing plain mutual
TLS handshakes (TLS 1.3, P-256 certificates, each its own key, signed by a
certificate authority the server trusts) against a plain Twisted TLS server,
each then staying connected, while a known plain TLS client keeps connecting;
measured the same way, with "held" meaning the server has completed the
storm client's handshake.

    python -m benchmarks.storm [--quick] [--clients N] [--handshakes N]
        [--systems dwtrust tls]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

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
        # The storm comes from one address (--source) but stands for a
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
            lambda: {"held": counting[0].requests},
        )
    )
    return finished


#: The common name of the plain TLS storm's client certificates starts so.
STORM_NAME = "storm"


def tlsServer(reactor: Any, pathsJSON: str, caPath: str) -> Deferred[None]:
    """
    The plain TLS reference: a Twisted TLS server of echoes, trusting the
    known client's certificate and the storm's certificate authority,
    counting the storm's completed handshakes as held.
    """
    _common.raiseFileLimit()
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    held = [0]

    @implementer(IHandshakeListener)
    class CountingEcho(Echo):
        def handshakeCompleted(self) -> None:
            certificate = self.transport.getPeerCertificate()  # type: ignore[union-attr]
            if certificate is None:
                return
            names = certificate.to_cryptography().subject.get_attributes_for_oid(
                NameOID.COMMON_NAME
            )
            if names and str(names[0].value).startswith(STORM_NAME):
                held[0] += 1

    factory = Factory.forProtocol(CountingEcho)
    factory.noisy = False
    port = _common.listenTLS(
        reactor, paths, factory, "ecdsa-p256", Path(caPath).read_bytes()
    )
    _common.serveCommands(
        reactor, {"port": port.getHost().port}, lambda: {"held": held[0]}
    )
    return finished


class _Waiting(Protocol):
    """
    A storm client's application, counted when connected.  For dwtrust
    version 1 that is once the server has proved itself (then it waits, as
    the server holds it); for version 2, only once the server has accepted
    it, which a held client never sees.  For plain TLS it stays connected.
    """

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def connectionMade(self) -> None:
        self.counts["connected"] += 1

    def connectionLost(self, reason: Failure | None = None) -> None:
        code = getattr(getattr(reason, "value", None), "code", None)
        key = f"closed:{getattr(code, 'value', code)}"
        self.counts[key] = self.counts.get(key, 0) + 1


def _tlsClients(
    clients: int, caPath: str, pathsJSON: str
) -> list[Callable[[Any, Any], Any]]:
    """
    Plain TLS storm clients: for each a P-256 key and a certificate signed by
    the storm's authority, made (with its OpenSSL context) in advance.
    """
    paths = json.loads(pathsJSON)
    caPEM = Path(caPath).read_bytes()
    serverPEM = Path(paths["serverPEM"]).read_bytes()
    options = [
        _common.tlsOptions(
            _common.selfSignedPEM(f"{STORM_NAME}{i}", issuerPEM=caPEM), serverPEM
        )
        for i in range(clients)
    ]

    def connector(tlsOptions: Any) -> Callable[[Any, Any], Any]:
        def connect(endpoint: Any, factory: Any) -> Any:
            return endpoint.connect(TLSMemoryBIOFactory(tlsOptions, True, factory))

        return connect

    return [connector(o) for o in options]


def _dwtrustClients(
    reactor: Any, clients: int, port: str
) -> list[Callable[[Any, Any], Any]]:
    """
    dwtrust storm clients: each an identity of its own (unknown to the
    server), made in advance.
    """
    from dwtrust import Authenticator, Identity, PinningPolicy
    from dwtrust.testing import MemoryTrustStore

    authenticators = [
        Authenticator(
            Identity.generate("storm", f"client{i}", "ecdsa-p256"),
            None,
            PinningPolicy(MemoryTrustStore()),
            reactor,
            timeout=STORM_TIMEOUT,
            decisionTimeout=120.0,
        )
        for i in range(clients)
    ]

    def connector(authenticator: Any) -> Callable[[Any, Any], Any]:
        def connect(endpoint: Any, factory: Any) -> Any:
            return authenticator.clientEndpoint(endpoint, f"{HOST}:{port}").connect(
                factory
            )

        return connect

    return [connector(a) for a in authenticators]


def stormer(
    reactor: Any,
    system: str,
    port: str,
    clients: str,
    source: str,
    *tlsArguments: str,
) -> Deferred[None]:
    """
    The storm's clients, in their own process: keys made in advance, then on
    C{go}, every connection at once, from the address C{source}.  C{system}
    is C{dwtrust} or C{tls} (then C{tlsArguments} are the authority's PEM
    file and the paths, as JSON).
    """
    _common.raiseFileLimit()
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    counts = {"connected": 0, "failed": 0}
    if system == "tls":
        connectors = _tlsClients(int(clients), *tlsArguments)
    else:
        connectors = _dwtrustClients(reactor, int(clients), port)
    factory = Factory.forProtocol(lambda: _Waiting(counts))
    factory.noisy = False

    def failed(reason: Failure) -> None:
        counts["failed"] += 1
        counts.setdefault("firstFailure", repr(reason.value))  # type: ignore[arg-type]

    class Commands(Protocol):
        def dataReceived(self, data: bytes) -> None:
            for line in data.decode().split():
                if line == "go":
                    for connector in connectors:
                        endpoint = TCP4ClientEndpoint(
                            reactor, HOST, int(port), bindAddress=(source, 0)
                        )
                        connector(endpoint, factory).addErrback(failed)
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

    print(json.dumps({"ready": len(connectors)}), flush=True)
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


async def storm(
    reactor: Any,
    options: argparse.Namespace,
    system: str,
    serverProcess: ServerProcess,
    stormProcess: ServerProcess,
    connect: _common.Connect,
) -> dict[str, Any]:
    """
    One storm against C{serverProcess}: the known client's calm phase, then
    the storm, with the known client still connecting.
    """
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
    allHeld = float("nan")
    deadline = started + options.limit
    while time.monotonic() < deadline:
        await _common.sleep(reactor, 0.25)
        stats = await serverProcess.commandInThread("stats")
        if stats["held"] >= options.clients:
            allHeld = time.monotonic() - started
            break
    stormSeconds = time.monotonic() - started
    await _common.sleep(reactor, options.calm)
    stop.append(True)
    await loop
    stormStats = await serverProcess.commandInThread("stats")
    if options.profile:
        profile = Path(options.profile).resolve()
        serverProcess.command(
            f"unprofile {profile.with_name(f'{profile.name}-{system}')}"
        )
    clients = await stormProcess.commandInThread("stats")
    results = {
        "secondsUntilAllHeld": allHeld,
        "held": stormStats["held"],
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
    print(f"  {system}: {results}", file=sys.stderr, flush=True)
    return results


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    _common.raiseFileLimit()
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    results: dict[str, Any] = {"clients": options.clients}
    for system in options.systems:
        if system == "dwtrust":
            # A fresh store: the storm's requests are recorded in it.
            used = dict(
                paths, serverStore=str(work / f"storm-{time.time_ns()}.sqlite3")
            )
            from twisted.python.filepath import FilePath

            from dwtrust import Identity, PeerIdentity

            serverIdentity = Identity.load(FilePath(paths["server"]))
            client = Identity.load(FilePath(paths["client"]))
            _common.approve(
                used["serverStore"],
                serverIdentity,
                [PeerIdentity(client.org, client.service, client.publicKey)],
            )
            serverProcess = ServerProcess(
                MODULE, json.dumps(used), str(options.clients), str(options.handshakes)
            )
            stormArguments: list[str] = []
        else:
            caPath = work / "storm-ca.pem"
            if not caPath.exists():
                caPath.write_bytes(_common.selfSignedPEM("storm-ca"))
            serverProcess = ServerProcess(MODULE, "tls", json.dumps(paths), str(caPath))
            stormArguments = [str(caPath), json.dumps(paths)]
        stormProcess = None
        authenticator = None
        try:
            stormProcess = ServerProcess(
                MODULE,
                "stormer",
                system,
                str(serverProcess.port),
                str(options.clients),
                options.source,
                *stormArguments,
            )
            seen: list[dict[str, Any]] = []
            if system == "dwtrust":
                connect, authenticator = await _common.dwtrustConnector(
                    reactor, used, serverProcess.port, seen=seen
                )
            else:
                connect = _common.tlsConnector(
                    reactor, paths, serverProcess.port, seen=seen
                )
            await connect()
            _common.checkProtocol(MODULE, f"{system} known client", None, seen)
            results[system] = await storm(
                reactor, options, system, serverProcess, stormProcess, connect
            )
        finally:
            if authenticator is not None:
                await authenticator.close()
            if stormProcess is not None:
                stormProcess.stop()
            serverProcess.stop()
    result = {"benchmark": "storm", "results": results}
    print(report(result), file=sys.stderr, flush=True)
    _common.emit(result)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and a == a else "n/a"


def report(result: dict[str, Any]) -> str:
    """
    The figures as a reStructuredText table: per system and phase, the
    server's stalls and memory and the known client's connections; then the
    storm's figures of dwtrust against plain TLS.
    """
    r = result["results"]
    systems = [s for s in ("dwtrust", "tls") if s in r]
    rows = [
        [
            system,
            phase,
            f"{r[system][phase]['maxLagMs']:.0f}",
            f"{r[system][phase]['p99LagMs']:.1f}",
            f"{r[system][phase].get('peakRssMiB', r[system][phase]['rssMiB']):.0f}",
            f"{r[system][phase]['known']['rate']:.0f}",
            f"{r[system][phase]['known']['p50Ms']:.1f}",
            f"{r[system][phase]['known']['p99Ms']:.0f}",
            f"{r[system][phase]['known']['maxMs']:.0f}",
            f"{r[system][phase]['known']['successRate']:.2f}",
            f"{r[system]['secondsUntilAllHeld']:.1f}" if phase == "storm" else "-",
        ]
        for system in systems
        for phase in ("calm", "storm")
    ]
    out = [
        f"Approval storm ({r['clients']} clients at once; dwtrust: unknown, held"
        " for an owner; tls: plain mutual TLS handshakes)",
        "",
        _common.table(
            [
                "system",
                "phase",
                "max stall ms",
                "p99 stall ms",
                "RSS MiB",
                "known conn/s",
                "known p50 ms",
                "p99 ms",
                "max ms",
                "known success",
                "s until all held",
            ],
            rows,
        ),
    ]
    if len(systems) == 2:
        d, t = r["dwtrust"]["storm"], r["tls"]["storm"]
        ratios = {
            "max stall": (d["maxLagMs"], t["maxLagMs"]),
            "p99 stall": (d["p99LagMs"], t["p99LagMs"]),
            "known p99": (d["known"]["p99Ms"], t["known"]["p99Ms"]),
            "known conn/s": (d["known"]["rate"], t["known"]["rate"]),
            "until all held": (
                r["dwtrust"]["secondsUntilAllHeld"],
                r["tls"]["secondsUntilAllHeld"],
            ),
        }
        out += [
            "",
            "dwtrust / plain TLS during the storm: "
            + ", ".join(f"{k} {_ratio(*v)}" for k, v in ratios.items()),
        ]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        if argv[1] == "stormer":
            react(lambda reactor: stormer(reactor, *argv[2:]))
        elif argv[1] == "tls":
            react(lambda reactor: tlsServer(reactor, argv[2], argv[3]))
        else:
            react(lambda reactor: server(reactor, *argv[1:4]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument(
        "--clients", type=int, default=None, help="default 1000 (300 with --quick)"
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=("dwtrust", "tls"),
        default=["dwtrust", "tls"],
        help="dwtrust, and plain TLS as the reference",
    )
    parser.add_argument(
        "--handshakes",
        type=int,
        default=0,
        help="TLS handshakes in progress at most (0: the default)",
    )
    parser.add_argument(
        "--source",
        default="127.0.1.1",
        help="the storm's source address (default 127.0.1.1: another /24 than"
        " the known client's 127.0.0.1, as a storm from elsewhere; 127.0.0.1"
        " puts it in the known client's source)",
    )
    parser.add_argument("--profile", default=None, help="the server's profile file")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    if options.clients is None:
        options.clients = 300 if options.quick else 1000
    options.calm = 2.0 if options.quick else 4.0
    options.limit = 60.0
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
