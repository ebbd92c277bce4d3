#!/usr/bin/env python3
"""
An atheris target for the dwtrust handshake: a real L{HandshakeProtocol}
(with its Automat machine), server-side or client-side, over an in-memory
transport with a synchronous clock, played against by the fuzzer.

The TLS layer is replaced by what the protocol asks of it: the channel it
reads at C{handshakeCompleted} (a fixed exporter value and the peer's real
certificate, made from its key as a dwtrust peer makes it) and a
L{StringTransport}.  The input is a script of steps: bytes of its own, the
honest peer's next frame (whole, split, or with one byte changed, and with
bytes after it), the trust decision (go on, or a refusal), time passing,
and the connection lost.  The honest frames carry valid proofs, so the
fuzzer reaches every state and plays garbage there.

A finding is any exception from the protocol, a failure logged or left in
a Deferred, or any of these broken:

- the application is connected only after a valid proof (the honest peer's
  frame was received) and a "go on" decision;
- a server sends C{ACCEPT}, and a client its C{PROOF}, only then too;
- the application receives exactly the bytes that followed the last
  handshake frame, none lost or doubled, and only once the handshake is
  over;
- everything the protocol sends is well-formed frames; at most one C{ERROR},
  and nothing at all once it has started to close.

Run with C{fuzz/run}; or C{python fuzz/fuzz_handshake.py -atheris_runs=N},
or C{python fuzz/fuzz_handshake.py CRASH-FILE} to replay one input.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["dwtrust"]):
    from OpenSSL import crypto
    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.logger import LogEvent, globalLogPublisher
    from twisted.python.failure import Failure
    from zope.interface import implementer

    from dwtrust._identity import Identity, PeerIdentity
    from dwtrust._machine import Refusal
    from dwtrust._policy import ITrustPolicy
    from dwtrust._proof import makeProof
    from dwtrust._protocol import HandshakeFactory, HandshakeProtocol
    from dwtrust._tls import makeCertificate
    from dwtrust._wire import (
        CHALLENGE_SIZE,
        Accept,
        Challenge,
        Error,
        ErrorCode,
        FrameDecoder,
        Hello,
        ProofFrame,
        Role,
        WireError,
        encodeFrame,
    )

SERVER = Identity.generate("acme", "ledger")
CLIENT = Identity.generate("acme", "billing")
EXPORTER = bytes(range(32))
CLIENT_CHALLENGE = b"c" * CHALLENGE_SIZE
SERVER_CHALLENGE = b"s" * CHALLENGE_SIZE
CODES = list(ErrorCode)
ADDRESS = IPv4Address("TCP", "10.0.0.2", 4321)
#: Each side's certificate, made once (as a peer makes its own, once).
CERTIFICATES = {i.fingerprint: makeCertificate(i) for i in (SERVER, CLIENT)}

#: What the honest client sends a server, and the honest server a client.
TO_SERVER = [
    encodeFrame(Hello(CLIENT_CHALLENGE)),
    encodeFrame(ProofFrame(makeProof(CLIENT, Role.client, SERVER_CHALLENGE, EXPORTER))),
]
TO_CLIENT = [
    encodeFrame(
        Challenge(
            SERVER_CHALLENGE,
            makeProof(SERVER, Role.server, CLIENT_CHALLENGE, EXPORTER),
        )
    ),
    encodeFrame(Accept()),
]


class Finding(AssertionError):
    """
    An invariant of the handshake does not hold.
    """


class FakeTLSConnection:
    """
    What L{dwtrust._tls.channelOf} reads from a finished TLS 1.3 handshake:
    the version, the exporter value, and the peer's certificate, a real one
    made from the peer's key as a dwtrust peer makes it (so that the code
    that reads it, whatever it asks of the certificate, reads the real
    thing).
    """

    def __init__(self, peer: Identity) -> None:
        self._certificate = CERTIFICATES[peer.fingerprint]
        self._x509 = crypto.X509.from_cryptography(self._certificate)

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_peer_certificate(self, *, as_cryptography: bool = False) -> Any:
        return self._certificate if as_cryptography else self._x509

    def get_peer_cert_chain(self, *, as_cryptography: bool = False) -> Any:
        # As a server sees it: the client's certificate alone.
        return [self.get_peer_certificate(as_cryptography=as_cryptography)]

    def export_keying_material(
        self, label: bytes, olen: int, context: bytes | None = None
    ) -> bytes:
        return EXPORTER[:olen]

    def get_alpn_proto_negotiated(self) -> bytes:
        # No ALPN: the connection speaks dwtrust version 1.
        return b""


class FakeTLSTransport(StringTransport):
    """
    A L{StringTransport} standing in for the TLS protocol under the
    handshake: it has a handle, and is its own connection for pausing.
    """

    def __init__(self, peer: Identity) -> None:
        super().__init__(peerAddress=ADDRESS)
        self._handle = FakeTLSConnection(peer)
        self.transport = self
        self.closedAt: int | None = None

    def getHandle(self) -> FakeTLSConnection:
        return self._handle

    def loseConnection(self) -> None:
        if self.closedAt is None:
            self.closedAt = len(self.value())
        super().loseConnection()

    def abortConnection(self) -> None:
        self.loseConnection()


@implementer(ITrustPolicy)
class ScriptedPolicy:
    """
    A trust policy whose answers the fuzzer gives.
    """

    def __init__(self) -> None:
        self.outstanding: list[Deferred[None]] = []
        self.asked: list[PeerIdentity] = []

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        decision: Deferred[None] = Deferred()
        self.asked.append(peer)
        self.outstanding.append(decision)
        return decision


class Application(Protocol):
    def __init__(self) -> None:
        self.made = 0
        self.received = b""
        self.lost = 0

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost += 1


class OneApplication(Factory):
    def __init__(self, application: Application) -> None:
        self.application = application

    def buildProtocol(self, addr: Any) -> Application:
        return self.application


def endOfHandshake(fed: bytes, last: type) -> int | None:
    """
    Where the bytes after the last handshake frame begin in C{fed}, decoded
    independently of the protocol; L{None} if C{fed} has no such frame.
    """
    decoder = FrameDecoder()
    decoder.feed(fed)
    try:
        while (frame := decoder.next()) is not None:
            if type(frame) is last:
                return len(fed) - len(decoder.remainder())
    except WireError:
        return None
    return None


#: The only proofs that verify on these connections: the honest peers'.
SERVER_PROOF = makeProof(SERVER, Role.server, CLIENT_CHALLENGE, EXPORTER)
CLIENT_PROOF = makeProof(CLIENT, Role.client, SERVER_CHALLENGE, EXPORTER)


def hasValidProof(fed: bytes, isClient: bool) -> bool:
    """
    Whether C{fed}, decoded independently of the protocol, holds the honest
    peer's proof: in a C{CHALLENGE} to a client (whose challenge field the
    proof does not cover: it is what the client signs) or a C{PROOF} to a
    server.
    """
    decoder = FrameDecoder()
    decoder.feed(fed)
    try:
        while (frame := decoder.next()) is not None:
            if isinstance(frame, Challenge if isClient else ProofFrame):
                expected = SERVER_PROOF if isClient else CLIENT_PROOF
                if frame.proof == expected:
                    return True
    except WireError:
        pass
    return False


class Run:
    """
    One input's run against one protocol.
    """

    def __init__(self, isClient: bool) -> None:
        self.isClient = isClient
        self.clock = Clock()
        self.policy = ScriptedPolicy()
        self.application = Application()
        identity, peer = (CLIENT, SERVER) if isClient else (SERVER, CLIENT)
        challenge = CLIENT_CHALLENGE if isClient else SERVER_CHALLENGE
        self.factory = HandshakeFactory(
            OneApplication(self.application),
            identity,
            self.policy,
            isClient,
            self.clock,
            timeout=10.0,
            decisionTimeout=30.0,
            source="10.0.0.2:4321",
            randomBytes=lambda n: challenge[:n],
        )
        protocol = self.factory.buildProtocol(ADDRESS)
        assert isinstance(protocol, HandshakeProtocol)
        self.protocol = protocol
        self.transport = FakeTLSTransport(peer)
        self.honest = TO_CLIENT if isClient else TO_SERVER
        self.next = 0
        self.fed = b""
        self.goOn = False
        self.lost = False
        self.trusted: list[bool] = []
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]
        protocol.handshakeCompleted()
        protocol.whenTrusted().addCallbacks(
            lambda _: self.trusted.append(True), lambda _: None
        )

    def feed(self, data: bytes) -> None:
        if self.lost or not data:
            return
        self.fed += data
        self.protocol.dataReceived(data)

    def decide(self, refusal: ErrorCode | None) -> None:
        if not self.policy.outstanding:
            return
        decision = self.policy.outstanding.pop(0)
        if decision.called:
            return  # cancelled
        if refusal is None:
            self.goOn = True
            decision.callback(None)
        else:
            decision.errback(Refusal(refusal))
        result = getattr(decision, "result", None)
        if isinstance(result, Failure):
            raise Finding(f"the decision's Deferred failed: {result.getTraceback()}")

    def step(self, provider: atheris.FuzzedDataProvider) -> None:
        kind = provider.ConsumeIntInRange(0, 8)
        if kind == 0:
            self.feed(provider.ConsumeBytes(provider.ConsumeIntInRange(0, 300)))
        elif kind in (1, 2, 3):
            if self.next >= len(self.honest):
                return
            frame = self.honest[self.next]
            self.next += 1
            if kind == 3:
                where = provider.ConsumeIntInRange(0, len(frame) - 1)
                flip = provider.ConsumeIntInRange(1, 255)
                frame = (
                    frame[:where] + bytes([frame[where] ^ flip]) + frame[where + 1 :]
                )
            after = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 40))
            if kind == 2:
                cut = provider.ConsumeIntInRange(0, len(frame))
                self.feed(frame[:cut])
                self.feed(frame[cut:] + after)
            else:
                self.feed(frame + after)
        elif kind == 4:
            self.decide(None)
        elif kind == 5:
            self.decide(provider.PickValueInList(CODES))
        elif kind == 6:
            self.clock.advance(provider.ConsumeIntInRange(0, 40))
        elif kind == 7 and not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionError("lost")))
        elif kind == 8:
            self.feed(self.honest[-1])

    def check(self) -> None:
        validProof = hasValidProof(self.fed, self.isClient)
        app = self.application
        if app.made and not (validProof and self.goOn):
            raise Finding("the application was connected without proof and trust")
        if app.made > 1 or app.lost > app.made:
            raise Finding(f"connected {app.made} times, lost {app.lost} times")

        sent = self.transport.value()
        decoder = FrameDecoder()
        decoder.feed(sent)
        frames = []
        try:
            while (frame := decoder.next()) is not None:
                frames.append(frame)
        except WireError as e:
            raise Finding(f"the protocol sent bytes that are not frames: {e}") from e
        if decoder.remainder():
            raise Finding("the protocol sent part of a frame")
        errors = [f for f in frames if isinstance(f, Error)]
        if len(errors) > 1 or (errors and frames[-1] is not errors[0]):
            raise Finding(f"ERROR frames out of place: {frames!r}")
        closedAt = self.transport.closedAt
        if closedAt is not None and len(sent) > closedAt:
            raise Finding("bytes were sent after the connection started to close")
        trustSent = ProofFrame if self.isClient else Accept
        if any(isinstance(f, trustSent) for f in frames) and not (
            validProof and self.goOn
        ):
            raise Finding(f"{trustSent.__name__} sent without proof and trust")

        if app.received:
            if not self.trusted:
                raise Finding("application bytes delivered before the handshake ended")
            start = endOfHandshake(self.fed, Accept if self.isClient else ProofFrame)
            if start is None or app.received != self.fed[start:][: len(app.received)]:
                raise Finding(
                    f"the application got {app.received!r}, not what followed"
                    " the last handshake frame"
                )
        if self.trusted and not self.lost and not self.transport.disconnecting:
            start = endOfHandshake(self.fed, Accept if self.isClient else ProofFrame)
            if start is None or app.received != self.fed[start:]:
                raise Finding(
                    f"the application got {app.received!r},"
                    f" not {self.fed[start or 0 :]!r}"
                )


failures: list[LogEvent] = []


def observe(event: LogEvent) -> None:
    if "log_failure" in event:
        failures.append(event)


globalLogPublisher.addObserver(observe)


def testOneInput(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    run = Run(isClient=provider.ConsumeBool())
    del failures[:]
    for _ in range(provider.ConsumeIntInRange(0, 24)):
        run.step(provider)
        run.check()
    if failures:
        raise Finding(f"a failure was logged: {failures[0]['log_failure']}")


def main() -> None:
    atheris.Setup(sys.argv, testOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
