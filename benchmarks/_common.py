"""
Shared pieces of the benchmarks: the machine's description, server processes
driven over their standard input, key and identity set-up, the tables, and
the systems compared (dwtrust, by protocol version and through its endpoint
string; plain Twisted TLS with mutual self-signed P-256 or Ed25519
certificates and dwtrust's key-exchange groups; and foolscap).

Every benchmark runs as a driver process (the client side) that spawns its
server side as ``python -m benchmarks.NAME server ...``; the server prints one
JSON line when it listens, then answers commands (``stats``, ``reset``,
``quit``) one JSON line each.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SYSTEMS = ("dwtrust", "tls", "foolscap")


# --- The machine ---------------------------------------------------------------


def machineInfo() -> dict[str, str]:
    """
    What the figures were measured on, read now.
    """
    import cryptography
    import OpenSSL
    from cryptography.hazmat.backends.openssl.backend import backend

    import twisted

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    osName = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osName = (
                    f"{line.split('=', 1)[1].strip(chr(34))} ({platform.release()})"
                )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": osName,
        "python": platform.python_version(),
        "openssl": backend.openssl_version_text(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def rssOf(pid: int, field: str = "VmRSS") -> int:
    """
    A process's resident memory in bytes (C{VmHWM} for its peak).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} for {pid}")


def raiseFileLimit(wanted: int = 65536) -> int:
    """
    Raise this process's open-file limit as far as allowed; return it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def emit(result: dict[str, Any]) -> None:
    """
    Print a benchmark's result as the line C{benchmarks/run} collects.
    """
    print("RESULT " + json.dumps(result), flush=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """
    A reStructuredText simple table.
    """
    widths = [
        max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)
    ]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append(rule)
    for row in rows:
        lines.append(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        )
    lines.append(rule)
    return "\n".join(lines)


def met(condition: bool) -> str:
    """
    How a target's result reads in the tables.
    """
    return "met" if condition else "MISSED"


# --- Server processes ----------------------------------------------------------


class ServerProcess:
    """
    A benchmark's server side, in its own process.
    """

    def __init__(self, module: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "server", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.pid = self.process.pid
        self.info: dict[str, Any] = self._read()
        self.port: int = self.info.get("port", 0)

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server {self.process.args!r} exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def command(self, name: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self._read()

    def commandInThread(self, name: str) -> Deferred[dict[str, Any]]:
        return threads.deferToThread(self.command, name)

    def rss(self) -> int:
        return rssOf(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.command("quit")
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LagMonitor:
    """
    Measures the reactor's stalls: a call every C{interval} seconds records how
    late it ran.
    """

    def __init__(self, clock: IReactorTime, interval: float = 0.01) -> None:
        self.interval = interval
        self.maxLag = 0.0
        self.lags: list[float] = []
        self._last = time.monotonic()
        self._call = LoopingCall(self._tick)
        self._call.clock = clock
        self._call.start(interval, now=False)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._last - self.interval)
        self._last = now
        self.lags.append(lag)
        self.maxLag = max(self.maxLag, lag)

    def reset(self) -> None:
        self.maxLag = 0.0
        self.lags = []
        self._last = time.monotonic()


class _Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(
        self, reactor: Any, stats: Callable[[], dict[str, Any]], lag: LagMonitor
    ) -> None:
        self._reactor = reactor
        self._stats = stats
        self._lag = lag
        self._profiler: Any = None

    def lineReceived(self, line: bytes) -> None:
        command, _, argument = line.decode().strip().partition(" ")
        reply: dict[str, Any] = {}
        if command == "stats":
            reply = {
                "rss": rssOf(os.getpid()),
                "peakRss": rssOf(os.getpid(), "VmHWM"),
                "maxLag": self._lag.maxLag,
                "p99Lag": percentile(self._lag.lags, 99),
                **self._stats(),
            }
        elif command == "reset":
            self._lag.reset()
        elif command == "profile":
            from pyinstrument import Profiler

            self._profiler = Profiler(interval=0.0005, async_mode="disabled")
            self._profiler.start()
        elif command == "unprofile":
            self._profiler.stop()
            Path(argument).write_text(self._profiler.output_text(unicode=False))
            self._profiler = None
        elif command == "cprofile":
            import cProfile

            self._profiler = cProfile.Profile()
            self._profiler.enable()
        elif command == "uncprofile":
            import io
            import pstats

            self._profiler.disable()
            text = io.StringIO()
            stats = pstats.Stats(self._profiler, stream=text)
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(120)
            Path(argument).write_text(text.getvalue())
            self._profiler = None
        elif command == "quit":
            self._reactor.callLater(0, self._reactor.stop)
        print(json.dumps(reply), flush=True)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._reactor.running:
            self._reactor.stop()


def serveCommands(
    reactor: Any, ready: dict[str, Any], stats: Callable[[], dict[str, Any]]
) -> None:
    """
    Announce C{ready} on standard output, then answer the driver's commands.
    """
    from twisted.internet.stdio import StandardIO

    lag = LagMonitor(reactor)
    print(json.dumps(ready), flush=True)
    StandardIO(_Commands(reactor, stats, lag), reactor=reactor)


# --- Protocols ------------------------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class OneByte(Protocol):
    """
    Sends one byte, waits for its echo, closes, and fires C{done} once closed.
    If given C{seen}, it adds what L{describe} tells of its connection, while
    C{seen} holds fewer than L{PROBES}.
    """

    def __init__(
        self, done: Deferred[None], seen: list[dict[str, Any]] | None = None
    ) -> None:
        self.done = done
        self.seen = seen

    def connectionMade(self) -> None:
        self.transport.write(b"x")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        # The handshakes are over by now (plain TLS connects its application
        # before its handshake).
        if self.seen is not None and len(self.seen) < PROBES:
            self.seen.append(describe(self.transport))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(None)


def oneByteFactory(
    done: Deferred[None], seen: list[dict[str, Any]] | None = None
) -> IProtocolFactory:
    factory = Factory.forProtocol(lambda: OneByte(done, seen))
    factory.noisy = False
    return factory


#: Connections L{OneByte} describes, at most.
PROBES = 3


def describe(transport: Any) -> dict[str, Any]:
    """
    What a connected application's transport tells of its connection: the
    dwtrust protocol version (C{None} for plain TLS or a dwtrust without
    versions, C{"?"} if it cannot be read), the TLS version and the
    key-exchange group.  It reads private attributes (the handshake behind
    dwtrust's transport, the OpenSSL connection under Twisted's TLS), so
    anything else missing is C{None}.
    """
    handshake = getattr(transport, "_handshake", None)
    tls = getattr(transport, "_tls", transport)
    connection = getattr(tls, "_tlsConnection", None)
    group = tlsVersion = None
    if connection is not None:
        with contextlib.suppress(Exception):
            group = connection.get_group_name()
            group = group.decode() if isinstance(group, bytes) else group
        with contextlib.suppress(Exception):
            tlsVersion = connection.get_protocol_version_name()
    protocol: int | str | None = None
    if handshake is not None:
        # "?": a dwtrust connection whose version cannot be read here.
        protocol = getattr(handshake, "protocolVersion", "?")
    elif hasattr(transport, "peer"):
        protocol = "?"
    return {
        "protocol": protocol,
        "tls": tlsVersion,
        "group": group,
    }


def cpuOf(pid: int) -> float:
    """
    The CPU seconds (user and system) a process has used.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# --- Keys and identities --------------------------------------------------------


def _newKey(algorithm: str) -> Any:
    if algorithm == "ed25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"no TLS reference for {algorithm!r}")


def selfSignedPEM(
    name: str, algorithm: str = "ecdsa-p256", issuerPEM: bytes | None = None
) -> bytes:
    """
    A key (P-256 or Ed25519) and a certificate for it, as PEM (key first):
    self-signed, or signed by the key and certificate in C{issuerPEM}.
    """
    key = _newKey(algorithm)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer, signer = subject, key
    if issuerPEM is not None:
        signer = serialization.load_pem_private_key(issuerPEM, None)
        issuer = x509.load_pem_x509_certificate(issuerPEM).subject
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.BasicConstraints(ca=issuerPEM is None, path_length=None), True
        )
        .sign(signer, None if algorithm == "ed25519" else hashes.SHA256())
    )
    keyFormat = (
        serialization.PrivateFormat.PKCS8
        if algorithm == "ed25519"
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    keyPEM: bytes = key.private_bytes(
        serialization.Encoding.PEM, keyFormat, serialization.NoEncryption()
    )
    return keyPEM + certificate.public_bytes(serialization.Encoding.PEM)


def tlsOptions(ownPEM: bytes, peerPEM: bytes, *morePeers: bytes) -> Any:
    """
    Plain Twisted TLS options for either side: our certificate, the peer's
    self-signed certificate (and any of C{morePeers}) as the only trust roots
    (so it is required and checked), TLS 1.3, no session cache and no tickets
    (CertificateOptions' defaults), and dwtrust's key-exchange groups
    (X25519MLKEM768 first), so that the reference pays for the same key
    exchange as dwtrust.
    """
    from twisted.internet import ssl

    from dwtrust._tls import PREFERRED_GROUPS, setGroups

    own = ssl.PrivateCertificate.loadPEM(ownPEM)
    peers = [ssl.Certificate.loadPEM(pem) for pem in (peerPEM, *morePeers)]
    options = ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        trustRoot=ssl.trustRootFromCertificates(peers),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
        enableSessions=False,
        enableSessionTickets=False,
    )
    # CertificateOptions builds its context once and keeps it: set the groups
    # on that one.
    setGroups(options.getContext(), PREFERRED_GROUPS)
    return options


def tlsPEMs(paths: dict[str, str], algorithm: str = "ecdsa-p256") -> tuple[str, str]:
    """
    The plain TLS server's and client's PEM files for C{algorithm}.
    """
    if algorithm == "ed25519":
        return paths["serverPEMEd25519"], paths["clientPEMEd25519"]
    return paths["serverPEM"], paths["clientPEM"]


def setUp(directory: Path, algorithm: str = "ecdsa-p256") -> dict[str, str]:
    """
    Make what the three systems need in C{directory}: dwtrust identities for a
    server and a client (of C{algorithm}), the server's store with the client
    approved by a signed decision, and P-256 and Ed25519 PEMs for plain TLS
    (P-256 for foolscap).
    """
    from twisted.python.filepath import FilePath

    from dwtrust import Identity, PeerIdentity

    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "server": str(directory / f"server-{algorithm}"),
        "client": str(directory / f"client-{algorithm}"),
        "serverStore": str(directory / f"server-{algorithm}.sqlite3"),
        "clientStore": str(directory / f"client-{algorithm}.sqlite3"),
        "serverPEM": str(directory / "server.pem"),
        "clientPEM": str(directory / "client.pem"),
        "serverPEMEd25519": str(directory / "server-ed25519.pem"),
        "clientPEMEd25519": str(directory / "client-ed25519.pem"),
    }
    if not Path(paths["server"]).exists():
        server = Identity.generate("bench", "server", algorithm)
        client = Identity.generate("bench", "client", algorithm)
        server.save(FilePath(paths["server"]))
        client.save(FilePath(paths["client"]))
        approve(
            paths["serverStore"],
            server,
            [PeerIdentity(client.org, client.service, client.publicKey)],
        )
    for which, tlsAlgorithm in (
        ("serverPEM", "ecdsa-p256"),
        ("clientPEM", "ecdsa-p256"),
        ("serverPEMEd25519", "ed25519"),
        ("clientPEMEd25519", "ed25519"),
    ):
        if not Path(paths[which]).exists():
            Path(paths[which]).write_bytes(selfSignedPEM(which, tlsAlgorithm))
    return paths


def approve(storePath: str, signer: Any, peers: list[Any]) -> None:
    """
    Record signed approvals of C{peers} in the SQLite store at C{storePath},
    synchronously, with the rows the store itself writes.
    """
    import sqlite3

    from twisted.python.filepath import FilePath

    from dwtrust._decision import SignedDecision
    from dwtrust.store._sqlite import migrateFile

    migrateFile(FilePath(storePath).path)
    now = time.time()
    rows = []
    decisions = []
    for peer in peers:
        decision = SignedDecision.make(
            signer,
            signer.name,
            peer,
            "approved",
            now,
            "benchmark",
            signer.fingerprint,
            1,
        )
        rows.append(
            (
                peer.fingerprint,
                peer.org,
                peer.service,
                peer.algorithm,
                peer.publicKey.blob,
                "approved",
                now,
                now,
                "benchmark",
                signer.fingerprint,
            )
        )
        decisions.append(
            (
                peer.fingerprint,
                1,
                peer.org,
                peer.service,
                peer.algorithm,
                peer.publicKey.blob,
                "approved",
                "benchmark",
                signer.fingerprint,
                now,
                decision.encode(),
            )
        )
    connection = sqlite3.connect(storePath)
    with connection:
        connection.executemany(
            "INSERT OR REPLACE INTO peers (fingerprint, org, service, algorithm,"
            " public_key, state, first_seen, last_seen, source, decided_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        connection.executemany(
            "INSERT INTO decisions (fingerprint, sequence, org, service,"
            " algorithm, public_key, state, decided_by, sent_by, recorded_at,"
            " decision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            decisions,
        )
    connection.close()


# --- Protocol versions ----------------------------------------------------------


def hasVersions() -> bool:
    """
    Whether the dwtrust imported speaks more than protocol version 1: its
    L{Authenticator} takes C{versions}.
    """
    import attrs

    from dwtrust import Authenticator

    return "versions" in attrs.fields_dict(Authenticator)


def requireVersions(versions: tuple[int, ...] | None, what: str) -> None:
    """
    Exit with a one-line message if C{versions} are asked for and the dwtrust
    imported cannot be told them.
    """
    if versions is None or hasVersions():
        return
    import dwtrust

    where = Path(dwtrust.__file__).parent.parent
    raise SystemExit(
        f"{what}: the dwtrust in {where} has no protocol versions"
        f" (Authenticator takes no versions=), so versions={versions!r}"
        " cannot be measured; run with PYTHONPATH pointing at a dwtrust that"
        " has version 2, or leave version 2 out (--versions 1)"
    )


def checkProtocol(
    module: str, name: str, expected: int | None, seen: list[dict[str, Any]]
) -> None:
    """
    Print what the first connections of C{name} negotiated (L{describe}); exit
    with a one-line message if a dwtrust that has versions negotiated another
    protocol version than C{expected}, as its figures would then measure the
    wrong thing.
    """
    if not seen:
        print(f"  {name}: (no connection described)", file=sys.stderr, flush=True)
        return
    first = seen[0]
    print(
        f"  {name}: dwtrust protocol {first['protocol']}, {first['tls']},"
        f" group {first['group']}",
        file=sys.stderr,
        flush=True,
    )
    if expected is None or not hasVersions():
        return
    got = {s["protocol"] for s in seen}
    if "?" in got:
        print(
            f"  {name}: WARNING: the negotiated protocol version cannot be read"
            " (dwtrust's transport changed?); not checked",
            file=sys.stderr,
            flush=True,
        )
        return
    if got != {expected}:
        raise SystemExit(
            f"{module}: {name} negotiated dwtrust protocol version(s)"
            f" {sorted(got, key=str)}, not {expected}: its figures would measure"
            " the wrong thing"
        )


def versionsArgument(versions: tuple[int, ...] | None) -> dict[str, Any]:
    """
    C{versions} as keyword arguments for L{Authenticator}: none for the
    default (or a dwtrust without versions).
    """
    return {} if versions is None else {"versions": versions}


# --- The systems: servers ------------------------------------------------------


def _benchmarkLimits() -> Any:
    """
    The default limits, but for the caps on connections not yet trusted per
    source and in total: a benchmark's clients all come from 127.0.0.1, and
    stand for many sources.
    """
    from dwtrust import Limits

    return Limits(maxUntrusted=1_000_000, maxUntrustedPerSource=1_000_000)


def listenDwtrust(
    reactor: Any,
    identityDir: str,
    storePath: str,
    application: IProtocolFactory,
    wrapStore: Callable[[Any], Any] | None = None,
    approver: Any = "known-only",
    timeout: float = 10.0,
    limits: Any = None,
    versions: tuple[int, ...] | None = None,
) -> Deferred[Any]:
    """
    Listen with dwtrust on a free port; fire with (port, authenticator).

    @param versions: the protocol versions the server accepts (C{None}: the
        default).

    @param limits: the server's L{dwtrust.Limits}, if not the defaults with
        no caps on connections per source or in total.

    @param storePath: a SQLite file, or a C{postgresql://} URL.
    """
    from twisted.python.filepath import FilePath

    from dwtrust import (
        ApprovalPolicy,
        Authenticator,
        Identity,
        PeerIdentity,
        PinningPolicy,
    )
    from dwtrust.approval import approverFromName
    from dwtrust.store import openStore

    identity = Identity.load(FilePath(identityDir))

    def opened(store: Any) -> tuple[Any, Any]:
        used = wrapStore(store) if wrapStore is not None else store
        if isinstance(approver, str):
            chosen = approverFromName(approver)
        elif hasattr(approver, "requestApproval"):
            chosen = approver
        else:
            chosen = approver(store)  # a function of the store
        authenticator = Authenticator(
            identity,
            ApprovalPolicy(used, chosen, identity),
            PinningPolicy(used),
            reactor,
            timeout=timeout,
            decisionTimeout=120.0,
            limits=_benchmarkLimits() if limits is None else limits,
            **versionsArgument(versions),
        )
        port = reactor.listenTCP(
            0,
            authenticator.wrapServerFactory(application),
            backlog=4096,
            interface=HOST,
        )
        return port, authenticator

    if storePath == "memory":
        # A diagnostic: the same handshake with the store in memory (no
        # thread hop, no SQLite), the client approved by a signed decision.
        from twisted.internet.defer import succeed

        from dwtrust.store import KeyState
        from dwtrust.testing import MemoryTrustStore, recordDecision

        store = MemoryTrustStore()
        client = Identity.load(
            FilePath(identityDir).sibling(
                FilePath(identityDir).basename().replace("server", "client")
            )
        )
        recordDecision(
            store,
            identity,
            identity,
            PeerIdentity(client.org, client.service, client.publicKey),
            KeyState.approved,
        )
        return succeed(store).addCallback(opened)
    return openStore(storePath).addCallback(opened)


def listenTLS(
    reactor: Any,
    paths: dict[str, str],
    application: IProtocolFactory,
    algorithm: str = "ecdsa-p256",
    *morePeers: bytes,
) -> Any:
    """
    Listen with plain Twisted TLS (L{tlsOptions}) on a free port, with the
    certificates of C{algorithm}; C{morePeers} are more trust roots.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    serverPEM, clientPEM = tlsPEMs(paths, algorithm)
    options = tlsOptions(
        Path(serverPEM).read_bytes(), Path(clientPEM).read_bytes(), *morePeers
    )
    return reactor.listenTCP(
        0,
        TLSMemoryBIOFactory(options, False, application),
        backlog=4096,
        interface=HOST,
    )


def serveSystem(
    reactor: Any,
    system: str,
    paths: dict[str, str],
    application: IProtocolFactory,
    stats: Callable[[], dict[str, Any]] = dict,
) -> Deferred[None]:
    """
    Serve C{application} as C{system} (C{dwtrust}, over the server's store,
    or plain C{tls}), and answer the driver's commands with C{stats} once it
    listens.  Fires when the reactor shuts down.
    """
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)

    def ready(port: Any) -> None:
        serveCommands(reactor, {"port": port.getHost().port}, stats)

    if system == "dwtrust":
        listenDwtrust(
            reactor, paths["server"], paths["serverStore"], application
        ).addCallback(lambda listened: ready(listened[0]))
    else:
        ready(listenTLS(reactor, paths, application))
    return finished


def _foolscap() -> Any:
    """
    C{foolscap.api}, untyped.
    """
    import importlib

    return importlib.import_module("foolscap.api")


class FoolscapEcho:
    """
    The foolscap server's one object.
    """

    @staticmethod
    def make() -> Any:
        Referenceable = _foolscap().Referenceable

        class Echo(Referenceable):  # type: ignore[misc,valid-type]
            def remote_echo(self, data: bytes) -> bytes:
                return data

        return Echo()


def listenFoolscap(paths: dict[str, str]) -> tuple[Any, int, str]:
    """
    A foolscap Tub with the server's P-256 certificate; returns (tub, port,
    furl).
    """
    import socket

    Tub = _foolscap().Tub

    probe = socket.socket()
    probe.bind((HOST, 0))
    port = probe.getsockname()[1]
    probe.close()
    tub = Tub(certData=Path(paths["serverPEM"]).read_bytes())
    tub.listenOn(f"tcp:{port}:interface={HOST}:backlog=4096")
    tub.setLocation(f"{HOST}:{port}")
    tub.startService()
    furl = tub.registerReference(FoolscapEcho.make(), "echo")
    return tub, port, furl


# --- The systems: clients ------------------------------------------------------

Connect = Callable[[], Awaitable[None]]


def dwtrustConnector(
    reactor: Any,
    paths: dict[str, str],
    port: int,
    memory: bool = False,
    versions: tuple[int, ...] | None = None,
    seen: list[dict[str, Any]] | None = None,
    address: str | None = None,
) -> Deferred[tuple[Connect, Any]]:
    """
    Fire with (connect once, authenticator) for a dwtrust client through
    L{Authenticator.clientEndpoint}.

    @param memory: keep the client's pins in memory (a diagnostic).
    @param versions: the protocol versions the client offers (C{None}: the
        default).
    @param seen: where the first connections are described (L{describe}).
    @param address: the name the server is pinned under (default: its
        address).
    """
    import attrs
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.python.filepath import FilePath

    from dwtrust import Identity, openAuthenticator

    identity = Identity.load(FilePath(paths["client"]))

    def opened(authenticator: Any) -> tuple[Connect, Any]:
        used = authenticator
        if versions is not None:
            # The same policies and store; the original keeps them and
            # closes them.
            used = attrs.evolve(authenticator, **versionsArgument(versions))
        endpoint = used.clientEndpoint(
            TCP4ClientEndpoint(reactor, HOST, port), address or f"{HOST}:{port}"
        )

        def connect() -> Deferred[None]:
            done: Deferred[None] = Deferred()
            endpoint.connect(oneByteFactory(done, seen)).addErrback(done.errback)
            return done

        return connect, authenticator

    if memory:
        from twisted.internet.defer import succeed

        from dwtrust import Authenticator, PinningPolicy
        from dwtrust.testing import MemoryTrustStore

        return succeed(
            Authenticator(identity, None, PinningPolicy(MemoryTrustStore()), reactor)
        ).addCallback(opened)
    return openAuthenticator(
        reactor, identity, FilePath(paths["clientStore"]), approver="known-only"
    ).addCallback(opened)


def stringConnector(
    reactor: Any,
    paths: dict[str, str],
    port: int,
    seen: list[dict[str, Any]] | None = None,
) -> Connect:
    """
    A dwtrust client through the C{dwtrust:} client endpoint string, as a
    program using C{clientFromString} has it, over a pin store of its own.
    """
    from twisted.internet.endpoints import clientFromString

    from dwtrust._endpoints import quoteArgument

    store = Path(paths["client"] + "-string")
    store.mkdir(exist_ok=True)
    description = (
        f"dwtrust:tcp:host={HOST}:port={port}"
        f":identity={quoteArgument(paths['client'])}"
        f":store={quoteArgument(str(store / 'pins.sqlite3'))}"
    )
    endpoint = clientFromString(reactor, description)

    def connect() -> Deferred[None]:
        done: Deferred[None] = Deferred()
        endpoint.connect(oneByteFactory(done, seen)).addErrback(done.errback)
        return done

    return connect


def tlsConnector(
    reactor: Any,
    paths: dict[str, str],
    port: int,
    algorithm: str = "ecdsa-p256",
    seen: list[dict[str, Any]] | None = None,
) -> Connect:
    """
    Plain Twisted TLS: C{TLSMemoryBIOFactory} over TCP, with the options of
    L{tlsOptions} and the certificates of C{algorithm} (no hostname check:
    like dwtrust, the trust root is the server's own certificate).
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

    serverPEM, clientPEM = tlsPEMs(paths, algorithm)
    options = tlsOptions(Path(clientPEM).read_bytes(), Path(serverPEM).read_bytes())
    endpoint = TCP4ClientEndpoint(reactor, HOST, port)

    def connect() -> Deferred[None]:
        done: Deferred[None] = Deferred()
        wrapped = TLSMemoryBIOFactory(options, True, oneByteFactory(done, seen))
        endpoint.connect(wrapped).addErrback(done.errback)
        return done

    return connect


def foolscapConnector(paths: dict[str, str], furl: str) -> Connect:
    """
    Each call: a fresh client Tub, a connection, one C{callRemote}, and the Tub
    stopped (which disconnects).  Tubs that run at the same time need
    certificates of their own (foolscap keeps one connection per pair of Tubs),
    so each takes a P-256 certificate from a pool.
    """
    Tub = _foolscap().Tub

    pool = [Path(paths["clientPEM"]).read_bytes()]

    async def connect() -> None:
        certData = pool.pop() if pool else selfSignedPEM("foolscap-client")
        tub = Tub(certData=certData)
        tub.startService()
        try:
            remote = await tub.getReference(furl)
            await remote.callRemote("echo", b"x")
        finally:
            await tub.stopService()
            pool.append(certData)

    return connect


async def measureRate(
    connect: Connect,
    concurrency: int,
    duration: float,
    clock: Any,
    serverPid: int | None = None,
) -> dict[str, Any]:
    """
    Run C{concurrency} workers, each connecting one connection after another,
    for C{duration} seconds; return the rate and latencies.
    """
    latencies: list[float] = []
    failures: list[str] = []
    serverCPU = cpuOf(serverPid) if serverPid else 0.0
    clientCPU = cpuOf(os.getpid())
    deadline = time.monotonic() + duration
    start = time.monotonic()

    async def worker() -> None:
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                await connect()
            except Exception as e:
                failures.append(repr(e))
                if len(failures) > 50:
                    return
                continue
            latencies.append(time.monotonic() - began)

    await DeferredList(
        [Deferred.fromCoroutine(worker()) for _ in range(concurrency)],
        consumeErrors=True,
    )
    elapsed = time.monotonic() - start
    count = max(1, len(latencies))
    serverCPU = (cpuOf(serverPid) - serverCPU) if serverPid else float("nan")
    clientCPU = cpuOf(os.getpid()) - clientCPU
    return {
        "serverCpuMs": serverCPU / count * 1000,
        "clientCpuMs": clientCPU / count * 1000,
        "rate": len(latencies) / elapsed,
        "count": len(latencies),
        "p50ms": percentile(latencies, 50) * 1000,
        "p99ms": percentile(latencies, 99) * 1000,
        "failures": len(failures),
        "firstFailure": failures[0] if failures else None,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def sleep(clock: Any, seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(clock, seconds, lambda: None)
