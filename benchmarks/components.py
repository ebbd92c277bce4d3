"""
What one connection costs, piece by piece, in one process and without a
profiler: the CPU time of each step a dwtrust server or client takes beyond
plain TLS, next to the TLS handshake itself.  This is not a client/server
benchmark; it is the breakdown that explains the connection-rate figures.

    python -m benchmarks.components [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from . import _common


def _handshake(serverContext: SSL.Context, clientContext: SSL.Context) -> Any:
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    for _ in range(10):
        for this, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                this.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(this.bio_read(65536))
    return server, client


class _NoEffects:
    """
    A handshake machine's effects, all doing nothing: what is left is the
    machine's own cost.
    """

    def sendFrame(self, frame: object) -> None:
        pass

    def requestDecision(self, peer: object) -> None:
        pass

    def cancelDecision(self) -> None:
        pass

    def connectApplication(self, peer: object) -> None:
        pass

    def established(self) -> None:
        pass

    def fail(self, *arguments: object) -> None:
        pass


def _machineRun(identity: Any, channel: Any) -> Callable[[], None]:
    """
    One server machine's inputs for a connection (tlsReady, then lost), with
    I/O and crypto stubbed out.
    """
    from dwtrust._machine import Core, buildServer

    newServer = buildServer()

    def machine() -> None:
        handshake = newServer(Core(identity, _NoEffects(), os.urandom))
        handshake.tlsReady(channel)
        handshake.lost()

    return machine


def timed(function: Callable[[], object], seconds: float) -> float:
    """
    Microseconds of CPU per call, the median of 5 batches.
    """
    function()
    count = 1
    while True:
        started = time.process_time()
        for _ in range(count):
            function()
        elapsed = time.process_time() - started
        if elapsed > seconds / 5:
            break
        count *= 2
    batches = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(count):
            function()
        batches.append((time.process_time() - started) / count * 1e6)
    return _common.median(batches)


def measure(algorithm: str, seconds: float, work: Path) -> dict[str, float]:
    from dwtrust import Identity, PeerIdentity
    from dwtrust._decision import SignedDecision, Signers
    from dwtrust._proof import makeProof, verifyProof
    from dwtrust._tls import channelOf, clearKeyCache, makeContext
    from dwtrust._wire import Challenge, FrameDecoder, Role, encodeFrame

    paths = _common.setUp(work, "ecdsa-p256")
    serverIdentity = Identity.generate("bench", "server", algorithm)
    clientIdentity = Identity.generate("bench", "client", algorithm)
    serverContext = makeContext(serverIdentity)
    clientContext = makeContext(clientIdentity)
    plainServer = _common.tlsOptions(
        Path(paths["serverPEM"]).read_bytes(), Path(paths["clientPEM"]).read_bytes()
    ).getContext()
    plainClient = _common.tlsOptions(
        Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
    ).getContext()
    server, _ = _handshake(serverContext, clientContext)
    channel = channelOf(server)
    challenge = os.urandom(32)
    proof = makeProof(clientIdentity, Role.client, challenge, channel.exporter)
    peer = PeerIdentity(clientIdentity.org, clientIdentity.service, channel.peerKey)
    decision = SignedDecision.make(
        serverIdentity,
        serverIdentity.name,
        peer,
        "approved",
        time.time(),
        "bench",
        serverIdentity.fingerprint,
        1,
    )
    encoded = decision.encode()
    signers = Signers([serverIdentity.publicKey])
    frame = Challenge(
        challenge, makeProof(serverIdentity, Role.server, challenge, channel.exporter)
    )
    wire = encodeFrame(frame)

    def encodeDecode() -> None:
        encodeFrame(frame)
        decoder = FrameDecoder()
        decoder.feed(wire)
        decoder.next()

    def channelUncached() -> None:
        clearKeyCache()
        channelOf(server)

    machine = _machineRun(serverIdentity, channel)

    results = {
        "tls handshake, plain P-256 contexts (both sides)": timed(
            lambda: _handshake(plainServer, plainClient), seconds
        ),
        "tls handshake, dwtrust contexts (both sides)": timed(
            lambda: _handshake(serverContext, clientContext), seconds
        ),
        "channelOf (certificate key cached)": timed(lambda: channelOf(server), seconds),
        "channelOf (certificate key parsed)": timed(channelUncached, seconds),
        "makeProof (one signature)": timed(
            lambda: makeProof(clientIdentity, Role.client, challenge, channel.exporter),
            seconds,
        ),
        "verifyProof (one verification)": timed(
            lambda: verifyProof(proof, Role.client, challenge, channel), seconds
        ),
        "signed decision: decode and verify (policy, per lookup)": timed(
            lambda: signers.verify(
                SignedDecision.decode(encoded),
                serverIdentity.name,
                serverIdentity.fingerprint,
            ),
            seconds,
        ),
        "frame: encode + decode a CHALLENGE": timed(encodeDecode, seconds),
        "Automat: a machine and 2 inputs": timed(machine, seconds),
    }
    return results


def _serverHandshake(serverContext: SSL.Context, clientContext: SSL.Context) -> float:
    """
    One TLS handshake in memory; the server side's CPU only, in seconds.
    """
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    spent = 0.0
    for _ in range(10):
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            server.bio_write(client.bio_read(65536))
        started = time.process_time()
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            client.bio_write(server.bio_read(65536))
        spent += time.process_time() - started
    return spent


def timedServer(
    serverContext: SSL.Context, clientContext: SSL.Context, seconds: float
) -> float:
    """
    Microseconds of the server side's CPU per TLS handshake, the median of 5
    batches.
    """
    batches = []
    count = 1
    while True:
        spent = sum(
            _serverHandshake(serverContext, clientContext) for _ in range(count)
        )
        if spent > seconds / 10:
            break
        count *= 2
    for _ in range(5):
        spent = sum(
            _serverHandshake(serverContext, clientContext) for _ in range(count)
        )
        batches.append(spent / count * 1e6)
    return _common.median(batches)


def _auditObserver(file: Any) -> Any:
    """
    The daemon's audit log observer (as C{--audit-log} installs it), writing
    to C{file}; that of code before L{dwtrust.tap.AuditObserver} too, for
    before-and-after runs.
    """
    try:
        from dwtrust.tap import AuditObserver
    except ImportError:
        from twisted.logger import FileLogObserver, FilteringLogObserver

        from dwtrust.tap import _isAuditEvent, auditLine  # type: ignore[attr-defined]

        return FilteringLogObserver(FileLogObserver(file, auditLine), [_isAuditEvent])
    return AuditObserver(file)


def budget(seconds: float) -> list[tuple[str, float]]:
    """
    The per-connection budget of one dwtrust server connection (protocol
    version 1, P-256 identities, a known client): the CPU of each piece, in
    microseconds.  Lines starting with two spaces are parts of the line
    above them, not additions to the total.
    """
    from twisted.internet.defer import Deferred, succeed
    from twisted.internet.task import Clock
    from twisted.logger import Logger, LogPublisher, textFileLogObserver

    from dwtrust import Identity, PeerIdentity
    from dwtrust._authority import Decisions
    from dwtrust._decision import SignedDecision, Signers
    from dwtrust._policy import ApprovalPolicy
    from dwtrust._proof import makeProof, verifyProof
    from dwtrust._tls import channelOf, makeContext
    from dwtrust._wire import (
        Accept,
        Challenge,
        FrameDecoder,
        Hello,
        ProofFrame,
        Role,
        encodeFrame,
    )
    from dwtrust.approval import approverFromName
    from dwtrust.store import KeyState
    from dwtrust.store._newest import NewestDecisions
    from dwtrust.testing import MemoryTrustStore

    work = Path(tempfile.mkdtemp(prefix="dwtrust-budget-"))
    paths = _common.setUp(work, "ecdsa-p256")
    serverIdentity = Identity.generate("bench", "server", "ecdsa-p256")
    clientIdentity = Identity.generate("bench", "client", "ecdsa-p256")
    serverContext = makeContext(serverIdentity)
    clientContext = makeContext(clientIdentity)
    plainServer = _common.tlsOptions(
        Path(paths["serverPEM"]).read_bytes(), Path(paths["clientPEM"]).read_bytes()
    ).getContext()
    plainClient = _common.tlsOptions(
        Path(paths["clientPEM"]).read_bytes(), Path(paths["serverPEM"]).read_bytes()
    ).getContext()
    server, _ = _handshake(serverContext, clientContext)
    channel = channelOf(server)
    challenge = os.urandom(32)
    clientProof = makeProof(clientIdentity, Role.client, challenge, channel.exporter)
    peer = PeerIdentity(clientIdentity.org, clientIdentity.service, channel.peerKey)
    decision = SignedDecision.make(
        serverIdentity,
        serverIdentity.name,
        peer,
        "approved",
        time.time(),
        "bench",
        serverIdentity.fingerprint,
        1,
    )

    class Store(MemoryTrustStore):
        """
        Counts attempts in memory, as the SQLite and PostgreSQL stores do
        (they write them once a second), not by rewriting the record.
        """

        counted: dict[str, int] = {}

        def seen(self, fingerprint: str, source: str) -> Deferred[None]:
            self.counted[fingerprint] = self.counted.get(fingerprint, 0) + 1
            return succeed(None)

    store = Store()
    store.record(
        peer,
        KeyState.approved,
        "bench",
        serverIdentity.fingerprint,
        decision.encode(),
        decision.sequence,
        serverIdentity.fingerprint,
    )
    clock = Clock()
    decisions = Decisions(
        serverIdentity,
        store,
        Signers(),
        NewestDecisions.inMemory(),
        clock=clock,
    )
    policy = ApprovalPolicy(
        store, approverFromName("known-only"), serverIdentity, decisions=decisions
    )
    record = store.lookup(peer.fingerprint).result  # type: ignore[attr-defined]
    source = "127.0.0.1:40000"

    def check() -> None:
        policy.check(peer, source)
        if len(clock.calls) > 1000:
            clock.advance(10)

    serverProof = makeProof(serverIdentity, Role.server, challenge, channel.exporter)
    frames = [
        Hello(os.urandom(32)),
        Challenge(challenge, serverProof),
        ProofFrame(clientProof),
        Accept(),
    ]
    wires = [encodeFrame(frame) for frame in frames]

    def encodeDecode() -> None:
        for frame in frames[1::2]:
            encodeFrame(frame)
        decoder = FrameDecoder()
        for wire in wires[0::2]:
            decoder.feed(wire)
            decoder.next()

    machine = _machineRun(serverIdentity, channel)

    async def twoAwaits() -> None:
        await succeed(None)
        await succeed(None)

    def coroutine() -> None:
        Deferred.fromCoroutine(twoAwaits())

    def deferreds() -> None:
        for _ in range(4):
            waiting: Deferred[None] = Deferred()
            waiting.addCallback(lambda _: None)
            waiting.callback(None)

    devnull = open(os.devnull, "w")  # noqa: SIM115
    quiet = LogPublisher()
    text = LogPublisher(textFileLogObserver(devnull))
    audited = LogPublisher(textFileLogObserver(devnull), _auditObserver(devnull))

    def authenticated(publisher: LogPublisher) -> Callable[[], None]:
        log = Logger(namespace="dwtrust._protocol", observer=publisher)

        def event() -> None:
            log.info(
                "dwtrust: authenticated {peerRole} {peer_name} {fingerprint}"
                " at {source}",
                event="dwtrust.authenticated",
                peer_name=peer.name,
                fingerprint=peer.fingerprint,
                algorithm=peer.algorithm,
                peerRole="client",
                source=source,
            )

        return event

    plain = timedServer(plainServer, plainClient, seconds)
    lines = [
        ("plain TLS 1.3 handshake, server side (the reference)", plain),
        (
            "dwtrust TLS handshake, server side",
            timedServer(serverContext, clientContext, seconds),
        ),
        (
            "channel binding: channelOf (key cached)",
            timed(lambda: channelOf(server), seconds),
        ),
        (
            "proofs: verify the client's, sign the server's",
            timed(
                lambda: (
                    verifyProof(clientProof, Role.client, challenge, channel),
                    makeProof(serverIdentity, Role.server, challenge, channel.exporter),
                ),
                seconds,
            ),
        ),
        ("frames: encode 2, decode 2", timed(encodeDecode, seconds)),
        ("machine: Automat, build + 2 inputs", timed(machine, seconds)),
        (
            "policy: ApprovalPolicy.check, known key, store in memory",
            timed(check, seconds),
        ),
        (
            "  of which: signed decision decode + verify",
            timed(lambda: decisions.verify(record), seconds),
        ),
        ("  of which: a coroutine Deferred with 2 awaits", timed(coroutine, seconds)),
        ("Deferreds: 4 made, 1 callback each", timed(deferreds, seconds)),
        (
            "logging: dwtrust.authenticated, nobody observing",
            timed(authenticated(quiet), seconds),
        ),
        (
            "logging: dwtrust.authenticated, twistd's text log",
            timed(authenticated(text), seconds),
        ),
        (
            "logging: dwtrust.authenticated, text log + audit log",
            timed(authenticated(audited), seconds),
        ),
    ]
    return lines


def printBudget(lines: list[tuple[str, float]]) -> None:
    plain = lines[0][1]
    print(
        f"  {'per server connection':60} {'us':>8} {'x plain TLS':>12}", file=sys.stderr
    )
    for name, value in lines:
        print(f"  {name:60} {value:8.1f} {value / plain:11.1%}", file=sys.stderr)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.components")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--directory", default=None)
    parser.add_argument(
        "--budget-only",
        action="store_true",
        help="only the per-connection budget of a server connection",
    )
    options = parser.parse_args(argv)
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    seconds = 0.5 if options.quick else 2.0
    lines = budget(seconds)
    printBudget(lines)
    if options.budget_only:
        _common.emit({"benchmark": "components", "budget": dict(lines)})
        return
    results = {
        algorithm: measure(algorithm, seconds, work)
        for algorithm in ("ecdsa-p256", "ed25519")
    }
    for algorithm, values in results.items():
        for name, value in values.items():
            print(f"  {algorithm:10} {name:60} {value:8.1f} us", file=sys.stderr)
    _common.emit({"benchmark": "components", "results": results, "budget": dict(lines)})


if __name__ == "__main__":
    main(sys.argv[1:])
