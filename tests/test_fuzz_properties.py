"""
Property tests (hypothesis) for the frame codec and the handshake machines,
beside those in C{tests/test_wire.py} and C{tests/test_attacks.py}: the
decoder fed any bytes cut anywhere, canonical encoding, and both machines
under any sequence of their inputs.  C{fuzz/} holds the atheris targets for
the same code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from automat import NoTransition
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dwtrust._machine import Core, buildClient, buildServer
from dwtrust._proof import makeProof
from dwtrust._tls import Channel
from dwtrust._wire import (
    CHALLENGE_SIZE,
    HEADER,
    MAX_BODY,
    Accept,
    Challenge,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Proof,
    ProofFrame,
    Role,
    WireError,
    encodeFields,
    encodeFrame,
)

from .helpers import makeIdentity
from .test_machine import RecordingEffects
from .test_wire import frames, proofs

SERVER = makeIdentity("acme", "ledger")
CLIENT = makeIdentity("acme", "billing")
EXPORTER = b"E" * 32
CLIENT_CHALLENGE = b"c" * CHALLENGE_SIZE
SERVER_CHALLENGE = b"s" * CHALLENGE_SIZE
SERVER_CHANNEL = Channel(EXPORTER, CLIENT.publicKey, "TLSv1.3")
CLIENT_CHANNEL = Channel(EXPORTER, SERVER.publicKey, "TLSv1.3")
CLIENT_PROOF = makeProof(CLIENT, Role.client, SERVER_CHALLENGE, EXPORTER)
SERVER_PROOF = makeProof(SERVER, Role.server, CLIENT_CHALLENGE, EXPORTER)

# The codec.


def decodePieces(pieces: list[bytes]) -> tuple[list[Frame], ErrorCode | None, int]:
    """
    Feed C{pieces} in turn, taking every whole frame after each: the frames,
    the code of the first error, and the most bytes left held after draining.
    """
    decoder = FrameDecoder()
    taken: list[Frame] = []
    held = 0
    for piece in pieces:
        decoder.feed(piece)
        try:
            while (frame := decoder.next()) is not None:
                taken.append(frame)
        except WireError as e:
            assert isinstance(e.code, ErrorCode)
            return taken, e.code, held
        rest = decoder.remainder()
        held = max(held, len(rest))
        decoder.feed(rest)
    return taken, None, held


#: Byte strings that are partly frames, partly anything.
streams = st.lists(
    st.one_of(
        frames.map(encodeFrame),
        st.binary(max_size=40),
        frames.map(encodeFrame).flatmap(
            lambda raw: st.integers(0, len(raw)).map(lambda n: raw[:n])
        ),
    ),
    max_size=5,
).map(b"".join)


class CodecPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(streams, st.lists(st.integers(0, 10_000), max_size=8))
    def test_anyBytesCutAnywhere(self, data: bytes, cuts: list[int]) -> None:
        """
        Any bytes, cut anywhere: the same frames and the same error as the
        bytes fed whole; never another exception; and never more than one
        largest frame held once every whole frame is taken.
        """
        points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(points)]
        whole = decodePieces([data])
        split = decodePieces(pieces)
        self.assertEqual(split[:2], whole[:2])
        self.assertLess(split[2], HEADER.size + MAX_BODY)

    @settings(max_examples=300, deadline=None)
    @given(
        st.sampled_from([t for t in FrameType if t is not FrameType.ERROR]),
        st.one_of(
            st.binary(max_size=200),
            st.lists(st.binary(max_size=80), max_size=7).map(
                lambda fields: encodeFields(*fields)
            ),
        ),
    )
    def test_canonical(self, frameType: FrameType, body: bytes) -> None:
        """
        A frame the decoder accepts encodes back to exactly its bytes: there
        is one encoding of each frame, so what is signed is unambiguous.
        (C{ERROR} text is made safe on parsing, so it is left out.)
        """
        raw = HEADER.pack(1, frameType, len(body)) + body
        decoder = FrameDecoder()
        decoder.feed(raw)
        try:
            frame = decoder.next()
        except WireError:
            return
        assert frame is not None
        self.assertEqual(encodeFrame(frame), raw)

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_roundTripEveryType(self, data: st.DataObject) -> None:
        """
        Each frame type, drawn in turn, decodes back to itself.
        """
        challenge = st.binary(min_size=CHALLENGE_SIZE, max_size=CHALLENGE_SIZE)
        messages = st.text(max_size=100).filter(str.isprintable)
        builders: dict[FrameType, st.SearchStrategy[Frame]] = {
            FrameType.HELLO: st.builds(Hello, challenge),
            FrameType.CHALLENGE: st.builds(Challenge, challenge, proofs),
            FrameType.PROOF: st.builds(ProofFrame, proofs),
            FrameType.ACCEPT: st.just(Accept()),
            FrameType.ERROR: st.builds(
                Error, st.sampled_from([c.value for c in ErrorCode]), messages
            ),
        }
        for frameType, builder in builders.items():
            frame = data.draw(builder, label=frameType.name)
            decoder = FrameDecoder()
            decoder.feed(encodeFrame(frame))
            self.assertEqual(decoder.next(), frame)
            self.assertEqual(decoder.remainder(), b"")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=60), st.binary(max_size=300))
    def test_errorTextAlwaysSafe(self, code: bytes, message: bytes) -> None:
        """
        Whatever a peer puts in an C{ERROR} frame, its text is printable and
        its code reads as an L{ErrorCode}; a code that is not UTF-8 is a
        C{protocol_error}.
        """
        try:
            code.decode("utf-8")
        except UnicodeDecodeError:
            error = self.assertRaises(
                WireError, Error.parse, encodeFields(code, message)
            )
            self.assertIs(error.code, ErrorCode.protocol_error)
            return
        frame = Error.parse(encodeFields(code, message))
        self.assertTrue(frame.code.isprintable() and frame.message.isprintable())
        self.assertIsInstance(frame.errorCode, ErrorCode)
        self.assertTrue(frame.explanation.isprintable())


# The machines.

badProof = Proof("acme", "billing", CLIENT.algorithm.name, CLIENT.publicKey.blob, b"x")
otherProof = makeProof(CLIENT, Role.client, b"o" * CHALLENGE_SIZE, EXPORTER)
codes = st.sampled_from(list(ErrorCode))
peerErrors = st.builds(
    Error, st.sampled_from([c.value for c in ErrorCode]), st.just("no")
)

#: Each server input, with what it is given.
serverInputs = st.one_of(
    st.tuples(st.just("tlsReady"), st.sampled_from([SERVER_CHANNEL, CLIENT_CHANNEL])),
    st.tuples(st.just("hello"), st.just(Hello(CLIENT_CHALLENGE))),
    st.tuples(
        st.just("proof"),
        st.sampled_from(
            [
                ProofFrame(CLIENT_PROOF),
                ProofFrame(badProof),
                ProofFrame(otherProof),
                ProofFrame(SERVER_PROOF),
            ]
        ),
    ),
    st.tuples(st.just("error"), peerErrors),
    st.tuples(
        st.just("unexpected"),
        st.sampled_from([Accept(), Challenge(SERVER_CHALLENGE, SERVER_PROOF)]),
    ),
    st.tuples(st.just("refuse"), codes.map(lambda code: (code, "refused"))),
    st.tuples(st.sampled_from(["trusted", "timedOut", "lost"]), st.just(())),
)
clientInputs = st.one_of(
    st.tuples(st.just("tlsReady"), st.sampled_from([CLIENT_CHANNEL, SERVER_CHANNEL])),
    st.tuples(
        st.just("challenge"),
        st.sampled_from(
            [
                Challenge(SERVER_CHALLENGE, SERVER_PROOF),
                Challenge(SERVER_CHALLENGE, CLIENT_PROOF),
                Challenge(SERVER_CHALLENGE, badProof),
                Challenge(
                    SERVER_CHALLENGE,
                    makeProof(SERVER, Role.server, b"o" * CHALLENGE_SIZE, EXPORTER),
                ),
            ]
        ),
    ),
    st.tuples(st.just("accept"), st.just(Accept())),
    st.tuples(st.just("error"), peerErrors),
    st.tuples(
        st.just("unexpected"),
        st.sampled_from([Hello(CLIENT_CHALLENGE), ProofFrame(CLIENT_PROOF)]),
    ),
    st.tuples(st.just("refuse"), codes.map(lambda code: (code, "refused"))),
    st.tuples(st.sampled_from(["trusted", "timedOut", "lost"]), st.just(())),
)


#: The honest sequences of inputs, in order, for each machine.
SERVER_HONEST: list[tuple[str, object]] = [
    ("tlsReady", SERVER_CHANNEL),
    ("hello", Hello(CLIENT_CHALLENGE)),
    ("proof", ProofFrame(CLIENT_PROOF)),
    ("trusted", ()),
]
CLIENT_HONEST: list[tuple[str, object]] = [
    ("tlsReady", CLIENT_CHANNEL),
    ("challenge", Challenge(SERVER_CHALLENGE, SERVER_PROOF)),
    ("trusted", ()),
    ("accept", Accept()),
]


def honestWithNoise(
    honest: list[tuple[str, object]],
    inputs: st.SearchStrategy[tuple[str, object]],
) -> st.SearchStrategy[list[tuple[str, object]]]:
    """
    The honest steps, in order, with any inputs before, between and after
    them, and any honest step left out: sequences that reach each stage of
    the handshake (proof verified, decision asked, decision given) far more
    often than inputs drawn at random do, so that a machine going a stage
    too far is caught.
    """
    gaps = st.lists(
        st.lists(inputs, max_size=2), min_size=len(honest) + 1, max_size=len(honest) + 1
    )
    keep = st.lists(st.booleans(), min_size=len(honest), max_size=len(honest))

    def build(
        drawn: tuple[list[list[tuple[str, object]]], list[bool]],
    ) -> list[tuple[str, object]]:
        between, kept = drawn
        sequence = list(between[0])
        for step, gap, present in zip(honest, between[1:], kept, strict=True):
            if present:
                sequence.append(step)
            sequence.extend(gap)
        return sequence

    return st.tuples(gaps, keep).map(build)


class MachineDriver:
    """
    Drives one machine as its protocol would, and checks, after every input,
    what it asked for.
    """

    def __init__(self, isClient: bool) -> None:
        self.isClient = isClient
        self.effects = RecordingEffects()
        ours = CLIENT_CHALLENGE if isClient else SERVER_CHALLENGE
        core = Core(CLIENT if isClient else SERVER, self.effects, lambda n: ours)
        self.machine: Any = (buildClient() if isClient else buildServer())(core)
        self.tlsGiven = False
        self.channelGood = False
        self.outstanding = False
        self.validProofGiven = False
        self.trustedGiven = False
        self.connected = False
        self.acceptAfterConnect = False
        self.failed = False

    def isValid(self, name: str, argument: object) -> bool:
        if not self.channelGood:
            return False
        if self.isClient:
            return (
                name == "challenge" and getattr(argument, "proof", None) == SERVER_PROOF
            )
        return name == "proof" and getattr(argument, "proof", None) == CLIENT_PROOF

    def give(self, name: str, argument: object) -> None:
        before = len(self.effects.calls)
        # Inputs the protocol never makes: a decision nobody asked for, and
        # a second end of the TLS handshake.  Those may be refused with
        # Automat's NoTransition, and must then do nothing.
        contractBroken = (name == "trusted" and not self.outstanding) or (
            name == "tlsReady" and self.tlsGiven
        )
        if name == "tlsReady" and not self.tlsGiven:
            self.tlsGiven = True
            self.channelGood = argument is (
                CLIENT_CHANNEL if self.isClient else SERVER_CHANNEL
            )
        if self.isValid(name, argument):
            self.validProofGiven = True
        if name == "trusted" and self.outstanding:
            self.trustedGiven = True
            self.outstanding = False
        if name == "accept" and self.connected:
            self.acceptAfterConnect = True
        method: Callable[..., None] = getattr(self.machine, name)
        arguments = argument if isinstance(argument, tuple) else (argument,)
        try:
            method(*arguments)
        except NoTransition:
            if not contractBroken:
                raise
            assert len(self.effects.calls) == before, self.effects.calls[before:]
            return
        self.checkEffects(self.effects.calls[before:])

    def checkEffects(self, new: list[tuple[str, Any]]) -> None:
        if self.failed:
            assert new == [], f"effects after a failure: {new}"
        for name, argument in new:
            assert not self.failed, f"{name} after a failure"
            if name == "requestDecision":
                assert self.validProofGiven, "a decision asked without a valid proof"
                expected = SERVER if self.isClient else CLIENT
                assert argument.publicKey.blob == expected.publicKey.blob
                self.outstanding = True
            elif name == "cancelDecision":
                self.outstanding = False
            elif name == "connectApplication":
                assert self.validProofGiven and self.trustedGiven, (
                    "the application connected without proof and trust"
                )
                self.connected = True
            elif name == "sendFrame":
                if isinstance(argument, (Accept, ProofFrame)):
                    assert self.validProofGiven and self.trustedGiven, argument
            elif name == "established":
                assert self.connected
                if self.isClient:
                    assert self.acceptAfterConnect
            elif name == "fail":
                self.failed = True
                self.outstanding = False


class MachinePropertyTests(SynchronousTestCase):
    """
    Whatever the inputs, in whatever order: no exception but Automat's
    refusal of inputs the protocol never makes; no application, C{ACCEPT} or
    C{PROOF} without a valid proof and a trust decision; nothing at all after
    a failure.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.one_of(
            st.lists(serverInputs, max_size=12),
            honestWithNoise(SERVER_HONEST, serverInputs),
        )
    )
    @example(SERVER_HONEST)
    @example(SERVER_HONEST[:3])
    @example(SERVER_HONEST[:2])
    def test_server(self, inputs: list[tuple[str, object]]) -> None:
        driver = MachineDriver(isClient=False)
        for name, argument in inputs:
            driver.give(name, argument)

    @settings(max_examples=200, deadline=None)
    @given(
        st.one_of(
            st.lists(clientInputs, max_size=12),
            honestWithNoise(CLIENT_HONEST, clientInputs),
        )
    )
    @example(CLIENT_HONEST)
    @example(CLIENT_HONEST[:3])
    @example(CLIENT_HONEST[:2])
    def test_client(self, inputs: list[tuple[str, object]]) -> None:
        driver = MachineDriver(isClient=True)
        for name, argument in inputs:
            driver.give(name, argument)

    def test_driverSeesSuccess(self) -> None:
        """
        The honest sequences get all the way through, so the properties
        above are not true only because nothing ever succeeds.
        """
        server = MachineDriver(isClient=False)
        for step in SERVER_HONEST:
            server.give(*step)
        self.assertIn("established", server.effects.names())
        client = MachineDriver(isClient=True)
        for step in CLIENT_HONEST:
            client.give(*step)
        self.assertIn("established", client.effects.names())

    def test_driverCatchesConnectionWithoutTrust(self) -> None:
        """
        The checks can fail: an application connected without a decision is
        caught.
        """
        driver = MachineDriver(isClient=False)
        with self.assertRaises(AssertionError):
            driver.checkEffects([("connectApplication", None)])
