"""
Tests for L{dwtrust._wire}: frames, their encoding and the incremental
decoder.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dwtrust._wire import (
    CHALLENGE_SIZE,
    MAX_BODY,
    MAX_MESSAGE,
    VERSION,
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
    decodeFields,
    encodeFields,
    encodeFrame,
    signedPayload,
)

HEADER = struct.Struct("!BBH")


def header(frameType: int, length: int, version: int = VERSION) -> bytes:
    return HEADER.pack(version, frameType, length)


def decodeAll(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = []
    while (frame := decoder.next()) is not None:
        frames.append(frame)
    return frames


# Strategies

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
)
challenges = st.binary(min_size=CHALLENGE_SIZE, max_size=CHALLENGE_SIZE)
proofs = st.builds(
    Proof,
    org=names,
    service=names,
    algorithm=names,
    publicKey=st.binary(max_size=600),
    signature=st.binary(max_size=520),
)
shortMessages = st.text(max_size=200).filter(
    lambda m: m.isprintable() and len(m.encode("utf-8")) <= MAX_MESSAGE
)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, challenges),
    st.builds(Challenge, challenges, proofs),
    st.builds(ProofFrame, proofs),
    st.just(Accept()),
    st.builds(Error, st.sampled_from([c.value for c in ErrorCode]), shortMessages),
)


def examples() -> list[Frame]:
    proof = Proof("acme", "billing", "ssh-ed25519", b"K" * 51, b"S" * 64)
    return [
        Hello(b"c" * CHALLENGE_SIZE),
        Challenge(b"d" * CHALLENGE_SIZE, proof),
        ProofFrame(proof),
        Accept(),
        Error("denied", "the owners said no"),
    ]


class EncodingTests(SynchronousTestCase):
    """
    Each frame type encodes and decodes back to itself.
    """

    def test_roundTripEachType(self) -> None:
        seen = set()
        for frame in examples():
            encoded = encodeFrame(frame)
            version, frameType, length = HEADER.unpack_from(encoded)
            self.assertEqual(version, VERSION)
            self.assertEqual(frameType, frame.type)
            self.assertEqual(length, len(encoded) - HEADER.size)
            self.assertEqual(decodeAll(encoded), [frame])
            seen.add(frame.type)
        self.assertEqual(seen, set(FrameType))

    def test_typeNumbers(self) -> None:
        self.assertEqual(
            {t.name: t.value for t in FrameType},
            {"HELLO": 1, "CHALLENGE": 2, "PROOF": 3, "ACCEPT": 4, "ERROR": 5},
        )

    def test_helloLayout(self) -> None:
        """
        A C{HELLO} is the header and the challenge as one field.
        """
        challenge = bytes(range(32))
        self.assertEqual(
            encodeFrame(Hello(challenge)),
            b"\x01\x01\x00\x22" + b"\x00\x20" + challenge,
        )

    def test_acceptLayout(self) -> None:
        self.assertEqual(encodeFrame(Accept()), b"\x01\x04\x00\x00")

    @settings(max_examples=200, deadline=None)
    @given(frames)
    def test_roundTrip(self, frame: Frame) -> None:
        self.assertEqual(decodeAll(encodeFrame(frame)), [frame])

    def test_errorMessageCut(self) -> None:
        """
        An error message longer than L{MAX_MESSAGE} bytes is cut, without
        splitting a character.
        """
        message = "é" * MAX_MESSAGE
        (decoded,) = decodeAll(encodeFrame(Error("denied", message)))
        assert isinstance(decoded, Error)
        self.assertEqual(decoded.message, "é" * (MAX_MESSAGE // 2))
        message = "x" + "é" * MAX_MESSAGE
        (decoded,) = decodeAll(encodeFrame(Error("denied", message)))
        assert isinstance(decoded, Error)
        self.assertEqual(decoded.message, "x" + "é" * ((MAX_MESSAGE - 1) // 2))

    def test_errorTextMadeSafe(self) -> None:
        """
        An C{ERROR} frame's text comes from a possibly hostile peer: control
        characters (terminal escapes, newlines that would forge log lines) and
        undecodable bytes are replaced, in the message and in the code.
        """
        body = encodeFields(b"denied\n", b"no\x1b[31m\nFORGED LINE\xff")
        (decoded,) = decodeAll(header(FrameType.ERROR, len(body)) + body)
        assert isinstance(decoded, Error)
        self.assertEqual(decoded.code, "denied\ufffd")
        self.assertEqual(decoded.message, "no\ufffd[31m\ufffdFORGED LINE\ufffd")
        self.assertIs(decoded.errorCode, ErrorCode.protocol_error)

    def test_errorCodes(self) -> None:
        """
        Known codes read as themselves; one this version does not know reads
        as C{protocol_error}.
        """
        for code in ErrorCode:
            self.assertIs(Error(code.value, "").errorCode, code)
        self.assertIs(Error("brand_new", "").errorCode, ErrorCode.protocol_error)
        self.assertEqual(
            {c.value for c in ErrorCode},
            {
                "pending",
                "denied",
                "revoked",
                "identity_changed",
                "bad_signature",
                "protocol_error",
                "timeout",
                "version_unsupported",
                "unavailable",
            },
        )

    def test_tooBigToEncode(self) -> None:
        proof = Proof("a", "b", "c", b"k" * MAX_BODY, b"")
        self.assertRaises(ValueError, encodeFrame, ProofFrame(proof))

    def test_fields(self) -> None:
        self.assertEqual(encodeFields(b"ab", b""), b"\x00\x02ab\x00\x00")
        self.assertEqual(decodeFields(b"\x00\x02ab\x00\x00", 2), [b"ab", b""])
        self.assertEqual(decodeFields(b"", 0), [])
        self.assertRaises(ValueError, encodeFields, b"x" * 0x10000)

    def test_signedPayloadLayout(self) -> None:
        """
        The signed payload is the label, version, role, claim, challenge and
        exporter, each as a field, so no two claims can sign the same bytes.
        """
        payload = signedPayload(
            Role.client, "acme", "billing", "ssh-ed25519", b"K", b"C", b"E"
        )
        self.assertEqual(
            decodeFields(payload, 9),
            [
                b"dwtrust-handshake-proof",
                b"\x01",
                b"client",
                b"acme",
                b"billing",
                b"ssh-ed25519",
                b"K",
                b"C",
                b"E",
            ],
        )
        self.assertNotEqual(
            signedPayload(Role.client, "ab", "c", "x", b"", b"", b""),
            signedPayload(Role.client, "a", "bc", "x", b"", b"", b""),
        )
        self.assertNotEqual(
            payload,
            signedPayload(
                Role.server, "acme", "billing", "ssh-ed25519", b"K", b"C", b"E"
            ),
        )


class DecoderTests(SynchronousTestCase):
    """
    L{FrameDecoder} gives whole frames, asks for more when it has a part of
    one, and refuses bad bytes with the right code.
    """

    def assertWireError(self, data: bytes, code: ErrorCode) -> WireError:
        decoder = FrameDecoder()
        decoder.feed(data)
        e = self.assertRaises(WireError, decoder.next)
        assert isinstance(e, WireError)
        self.assertIs(e.code, code)
        return e

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data: bytes) -> None:
        """
        Arbitrary bytes give frames, or ask for more, or raise L{WireError}:
        never any other exception.
        """
        decoder = FrameDecoder()
        decoder.feed(data)
        try:
            while decoder.next() is not None:
                pass
        except WireError as e:
            self.assertIsInstance(e.code, ErrorCode)

    @settings(max_examples=400, deadline=None)
    @given(
        frameType=st.sampled_from(list(FrameType)),
        body=st.one_of(
            st.binary(max_size=300),
            st.lists(st.binary(max_size=40), max_size=7).map(
                lambda fields: encodeFields(*fields)
            ),
        ),
    )
    def test_arbitraryBodies(self, frameType: FrameType, body: bytes) -> None:
        """
        Any body under a valid header decodes to a frame of that type or is
        refused with C{protocol_error}; every frame but C{ERROR} (whose
        message is only informative) is read only from its canonical
        encoding.
        """
        decoder = FrameDecoder()
        decoder.feed(header(frameType, len(body)) + body)
        try:
            frame = decoder.next()
        except WireError as e:
            self.assertIs(e.code, ErrorCode.protocol_error)
        else:
            assert frame is not None
            self.assertEqual(frame.type, frameType)
            if frameType is not FrameType.ERROR:
                self.assertEqual(encodeFrame(frame)[HEADER.size :], body)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames, min_size=1, max_size=4), st.data())
    def test_splitAnywhere(self, sent: list[Frame], data: st.DataObject) -> None:
        """
        Frames split at any points across C{feed} calls decode to the same
        frames.
        """
        encoded = b"".join(encodeFrame(f) for f in sent)
        cuts = sorted(
            data.draw(st.lists(st.integers(0, len(encoded)), max_size=8), label="cuts")
        )
        decoder = FrameDecoder()
        received: list[Frame] = []
        start = 0
        for end in [*cuts, len(encoded)]:
            decoder.feed(encoded[start:end])
            start = end
            while (frame := decoder.next()) is not None:
                received.append(frame)
        self.assertEqual(received, sent)
        self.assertEqual(decoder.remainder(), b"")

    def test_byteAtATime(self) -> None:
        for frame in examples():
            encoded = encodeFrame(frame)
            decoder = FrameDecoder()
            for i in range(len(encoded) - 1):
                decoder.feed(encoded[i : i + 1])
                self.assertIsNone(decoder.next())
            decoder.feed(encoded[-1:])
            self.assertEqual(decoder.next(), frame)
            self.assertIsNone(decoder.next())

    @settings(max_examples=200, deadline=None)
    @given(frames, st.data())
    def test_truncated(self, frame: Frame, data: st.DataObject) -> None:
        """
        Any proper prefix of a valid frame asks for more (L{None}), and never
        gives a frame or raises.
        """
        encoded = encodeFrame(frame)
        cut = data.draw(st.integers(0, len(encoded) - 1), label="cut")
        decoder = FrameDecoder()
        decoder.feed(encoded[:cut])
        self.assertIsNone(decoder.next())
        self.assertIsNone(decoder.next())
        decoder.feed(encoded[cut:])
        self.assertEqual(decoder.next(), frame)

    def test_oversizedHeaderRefusedAtOnce(self) -> None:
        """
        A header announcing a body over L{MAX_BODY} is refused as soon as the
        header is in, before any of the body arrives.
        """
        for frameType in FrameType:
            for length in [MAX_BODY + 1, 0x8000, 0xFFFF]:
                e = self.assertWireError(
                    header(frameType, length), ErrorCode.protocol_error
                )
                self.assertIn(str(MAX_BODY), e.message)

    def test_largestBody(self) -> None:
        """
        A header announcing exactly L{MAX_BODY} bytes waits for them.
        """
        decoder = FrameDecoder()
        decoder.feed(header(FrameType.PROOF, MAX_BODY) + b"\x00" * 100)
        self.assertIsNone(decoder.next())

    def test_wrongVersion(self) -> None:
        for version in [0, 2, 0x16, 0xFF]:
            e = self.assertWireError(
                header(FrameType.HELLO, 34, version=version),
                ErrorCode.version_unsupported,
            )
            self.assertIn(str(version), e.message)

    def test_wrongVersionFirstByte(self) -> None:
        """
        The version is checked as soon as the header is in: a TLS record or
        an HTTP request is refused without waiting for a body.
        """
        self.assertWireError(b"GET / HTTP/1.1\r\n", ErrorCode.version_unsupported)

    def test_unknownType(self) -> None:
        for frameType in [0, 6, 0x7F, 0xFF]:
            e = self.assertWireError(header(frameType, 0), ErrorCode.protocol_error)
            self.assertIn(str(frameType), e.message)

    def test_trailingBytesInBody(self) -> None:
        """
        A body with bytes after its last field is refused.
        """
        for frame in examples():
            body = encodeFrame(frame)[HEADER.size :] + b"\x00"
            self.assertWireError(
                header(frame.type, len(body)) + body, ErrorCode.protocol_error
            )

    def test_missingFields(self) -> None:
        for frame in examples():
            body = encodeFrame(frame)[HEADER.size :]
            if not body:
                continue
            shortened = body[:-1]
            self.assertWireError(
                header(frame.type, len(shortened)) + shortened,
                ErrorCode.protocol_error,
            )

    def test_fieldLengthPastBody(self) -> None:
        body = b"\x00\x40" + b"c" * 32
        self.assertWireError(
            header(FrameType.HELLO, len(body)) + body, ErrorCode.protocol_error
        )

    def test_wrongChallengeSize(self) -> None:
        for size in [0, 31, 33]:
            body = encodeFields(b"c" * size)
            self.assertWireError(
                header(FrameType.HELLO, len(body)) + body, ErrorCode.protocol_error
            )

    def test_namesNotUTF8(self) -> None:
        body = encodeFields(b"\xff", b"billing", b"ssh-ed25519", b"k", b"s")
        self.assertWireError(
            header(FrameType.PROOF, len(body)) + body, ErrorCode.protocol_error
        )

    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames, min_size=1, max_size=3), st.binary(max_size=100))
    def test_remainder(self, sent: list[Frame], rest: bytes) -> None:
        """
        After the frames a caller takes, C{remainder} gives exactly the bytes
        that followed them, and empties the decoder.
        """
        decoder = FrameDecoder()
        decoder.feed(b"".join(encodeFrame(f) for f in sent) + rest)
        for frame in sent:
            self.assertEqual(decoder.next(), frame)
        self.assertEqual(decoder.remainder(), rest)
        self.assertEqual(decoder.remainder(), b"")
        self.assertIsNone(decoder.next())

    def test_remainderAfterMoreFeeds(self) -> None:
        decoder = FrameDecoder()
        hello = encodeFrame(Hello(b"h" * 32))
        decoder.feed(hello[:10])
        self.assertIsNone(decoder.next())
        decoder.feed(hello[10:] + b"app")
        decoder.feed(b" data")
        self.assertEqual(decoder.next(), Hello(b"h" * 32))
        self.assertEqual(decoder.remainder(), b"app data")
