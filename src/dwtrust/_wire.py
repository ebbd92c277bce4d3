"""
The dwtrust wire format: frames, their fields, the canonical bytes that are
signed, and the error codes.  ``docs/protocol.rst`` specifies all of it byte by
byte; ``tests/test_vectors.py`` holds the two to each other.

A frame is a 4-byte header (version, type, body length as a big-endian
16-bit number) and a body of at most L{MAX_BODY} bytes.  A body is a sequence
of fields, each a big-endian 16-bit length and that many bytes, with exactly
the number of fields its type has and nothing after them.
"""

from __future__ import annotations

import enum
import struct
from typing import ClassVar

from attrs import frozen

VERSION = 1
#: The protocol versions this implementation speaks, newest first.
VERSIONS = (2, 1)
MAX_BODY = 4096
HEADER = struct.Struct("!BBH")
CHALLENGE_SIZE = 32
EXPORTER_SIZE = 32
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
SIGNATURE_LABEL = b"dwtrust-handshake-proof"
MAX_MESSAGE = 256


class ErrorCode(enum.Enum):
    """
    Why a handshake failed.  The value is what travels in an C{ERROR} frame.
    """

    pending = "pending"
    denied = "denied"
    revoked = "revoked"
    identity_changed = "identity_changed"
    bad_signature = "bad_signature"
    protocol_error = "protocol_error"
    timeout = "timeout"
    version_unsupported = "version_unsupported"
    unavailable = "unavailable"


EXPLANATIONS: dict[ErrorCode, str] = {
    ErrorCode.pending: "the peer's owners have not approved this key yet",
    ErrorCode.denied: "the peer does not trust this key",
    ErrorCode.revoked: "this key was revoked",
    ErrorCode.identity_changed: (
        "the service presented a different key from the one on record;"
        " this could be an attack, or the key may have been replaced"
    ),
    ErrorCode.bad_signature: "the peer's proof of identity did not verify",
    ErrorCode.protocol_error: "the peer broke the dwtrust protocol",
    ErrorCode.timeout: "the handshake took too long",
    ErrorCode.version_unsupported: "the peer speaks another dwtrust version",
    ErrorCode.unavailable: "the trust service is unavailable",
}


class Role(enum.Enum):
    client = b"client"
    server = b"server"


class FrameType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    PROOF = 3
    ACCEPT = 4
    ERROR = 5


class WireError(Exception):
    """
    Bytes that are not a valid frame.

    @ivar code: the L{ErrorCode} to answer with.
    """

    def __init__(self, code: ErrorCode, message: str, answer: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.answer = answer


def encodeFields(*fields: bytes) -> bytes:
    """
    The canonical encoding of a sequence of byte strings: each is a big-endian
    16-bit length and its bytes.
    """
    out = []
    for f in fields:
        if len(f) > 0xFFFF:
            raise ValueError("a field is longer than 65535 bytes")
        out.append(len(f).to_bytes(2, "big"))
        out.append(f)
    return b"".join(out)


def decodeFields(body: bytes, count: int) -> list[bytes]:
    """
    Split a body into exactly C{count} fields.

    @raise WireError: if it does not hold exactly that.
    """
    fields = []
    offset = 0
    for _ in range(count):
        if offset + 2 > len(body):
            raise WireError(ErrorCode.protocol_error, "truncated field")
        length = int.from_bytes(body[offset : offset + 2], "big")
        offset += 2
        if offset + length > len(body):
            raise WireError(ErrorCode.protocol_error, "truncated field")
        fields.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise WireError(ErrorCode.protocol_error, "trailing bytes after the fields")
    return fields


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(ErrorCode.protocol_error, f"{what} is not UTF-8") from None


def _fixed(raw: bytes, size: int, what: str) -> bytes:
    if len(raw) != size:
        raise WireError(
            ErrorCode.protocol_error, f"{what} must be {size} bytes, not {len(raw)}"
        )
    return raw


@frozen
class Proof:
    """
    A claim of identity and its signature, as carried in C{CHALLENGE} and
    C{PROOF} frames.
    """

    org: str
    service: str
    algorithm: str
    publicKey: bytes
    signature: bytes

    def fields(self) -> tuple[bytes, ...]:
        return (
            self.org.encode("utf-8"),
            self.service.encode("utf-8"),
            self.algorithm.encode("utf-8"),
            self.publicKey,
            self.signature,
        )

    @classmethod
    def fromFields(cls, fields: list[bytes]) -> Proof:
        org, service, algorithm, publicKey, signature = fields
        return cls(
            _text(org, "the organization"),
            _text(service, "the service"),
            _text(algorithm, "the algorithm"),
            publicKey,
            signature,
        )


@frozen
class Hello:
    """
    The client's auth request: the challenge the server must sign.
    """

    type: ClassVar[FrameType] = FrameType.HELLO
    challenge: bytes

    def body(self) -> bytes:
        return encodeFields(self.challenge)

    @classmethod
    def parse(cls, body: bytes) -> Hello:
        (challenge,) = decodeFields(body, 1)
        return cls(_fixed(challenge, CHALLENGE_SIZE, "the challenge"))


@frozen
class Challenge:
    """
    The server's challenge for the client, with the server's own proof.
    """

    type: ClassVar[FrameType] = FrameType.CHALLENGE
    challenge: bytes
    proof: Proof

    def body(self) -> bytes:
        return encodeFields(self.challenge, *self.proof.fields())

    @classmethod
    def parse(cls, body: bytes) -> Challenge:
        challenge, *rest = decodeFields(body, 6)
        return cls(
            _fixed(challenge, CHALLENGE_SIZE, "the challenge"), Proof.fromFields(rest)
        )


@frozen
class ProofFrame:
    """
    The client's proof.
    """

    type: ClassVar[FrameType] = FrameType.PROOF
    proof: Proof

    def body(self) -> bytes:
        return encodeFields(*self.proof.fields())

    @classmethod
    def parse(cls, body: bytes) -> ProofFrame:
        return cls(Proof.fromFields(decodeFields(body, 5)))


@frozen
class Accept:
    """
    The server accepts the client; application data follows.
    """

    type: ClassVar[FrameType] = FrameType.ACCEPT

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, body: bytes) -> Accept:
        decodeFields(body, 0)
        return cls()


@frozen
class Error:
    """
    The handshake failed; the sender closes the connection after this.
    """

    type: ClassVar[FrameType] = FrameType.ERROR
    code: str
    message: str

    def body(self) -> bytes:
        message = self.message.encode("utf-8")[:MAX_MESSAGE]
        # Cutting may split a character; drop the partial one.
        message = message.decode("utf-8", "ignore").encode("utf-8")
        return encodeFields(self.code.encode("ascii"), message)

    @classmethod
    def parse(cls, body: bytes) -> Error:
        """
        Parse an C{ERROR} frame.  Its text comes from a peer that may be
        hostile: undecodable bytes and control characters are replaced, so
        that it can be logged and shown safely.
        """
        code, message = decodeFields(body, 2)
        return cls(
            _printable(_text(code, "the error code")), _printable(message)[:MAX_MESSAGE]
        )

    @property
    def errorCode(self) -> ErrorCode:
        """
        The code as an L{ErrorCode}; a code this version does not know reads as
        C{protocol_error}.
        """
        try:
            return ErrorCode(self.code)
        except ValueError:
            return ErrorCode.protocol_error

    @property
    def explanation(self) -> str:
        """
        The message, prefixed with the code when the code is not one this
        version knows, so that it is not lost.
        """
        if self.errorCode.value == self.code:
            return self.message
        return f"unknown error code {self.code!r}: {self.message}"


def _printable(raw: bytes | str) -> str:
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


@frozen
class ProofAccept:
    """
    Version 2's C{ACCEPT}: the server accepts the client and proves itself
    (role C{server}); application data follows.
    """

    type: ClassVar[FrameType] = FrameType.ACCEPT
    proof: Proof

    def body(self) -> bytes:
        return encodeFields(*self.proof.fields())

    @classmethod
    def parse(cls, body: bytes) -> ProofAccept:
        return cls(Proof.fromFields(decodeFields(body, 5)))


Frame = Hello | Challenge | ProofFrame | Accept | Error | ProofAccept
_Parser = type[Hello | Challenge | ProofFrame | Accept | Error | ProofAccept]

#: The frame types of each version, by their type byte.
_PARSERS: dict[int, dict[int, _Parser]] = {
    1: {t.type: t for t in (Hello, Challenge, ProofFrame, Accept, Error)},
    2: {t.type: t for t in (ProofFrame, ProofAccept, Error)},
}


def encodeFrame(frame: Frame, version: int = VERSION) -> bytes:
    """
    The bytes of C{frame} in protocol C{version} (its header's first byte).
    """
    body = frame.body()
    if len(body) > MAX_BODY:
        raise ValueError(f"a frame body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(version, frame.type, len(body)) + body


class FrameDecoder:
    """
    Takes bytes as they arrive and gives back whole frames, one at a time, so
    that the caller can stop at the last handshake frame and hand the rest of
    the bytes, untouched, to the application.

    @ivar version: the protocol version of the connection; frames of another
        version are refused, and so are types that version does not have.
    """

    def __init__(self, version: int = VERSION) -> None:
        self._buffer = b""
        self._first = True
        self.version = version
        self._parsers = _PARSERS[version]

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> Frame | None:
        """
        The next whole frame, or L{None} if more bytes are needed.

        @raise WireError: at the first byte that cannot begin or be part of a
            valid frame; a header announcing too long a body is refused before
            the body arrives.  A frame of type C{ERROR} that fails a check is
            not to be answered (L{WireError.answer} is false): the peer is
            closing anyway, and two peers must never answer each other's
            errors.
        """
        if len(self._buffer) < HEADER.size:
            return None
        version, frameType, length = HEADER.unpack_from(self._buffer)
        try:
            return self._next(version, frameType, length)
        except WireError as e:
            if frameType == FrameType.ERROR:
                e.answer = False
            raise

    def _next(self, version: int, frameType: int, length: int) -> Frame | None:
        if version != self.version:
            if not self._first:
                # The version was settled by the first frame; this is not a
                # peer of another version, but bytes out of place.
                raise WireError(
                    ErrorCode.protocol_error,
                    f"a frame of version {version} after frames of version"
                    f" {self.version}",
                )
            raise WireError(
                ErrorCode.version_unsupported,
                f"version {version} is not supported on this connection, which"
                f" speaks {self.version}",
            )
        parser = self._parsers.get(frameType)
        if parser is None:
            raise WireError(
                ErrorCode.protocol_error,
                f"unknown frame type {frameType} in version {self.version}",
            )
        if length > MAX_BODY:
            raise WireError(
                ErrorCode.protocol_error,
                f"a frame of {length} bytes exceeds the maximum of {MAX_BODY}",
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body, self._buffer = self._buffer[HEADER.size : end], self._buffer[end:]
        self._first = False
        return parser.parse(body)

    def remainder(self) -> bytes:
        """
        The bytes received after the last frame taken, emptying the buffer.
        """
        rest, self._buffer = self._buffer, b""
        return rest


def signedPayload(
    role: Role,
    org: str,
    service: str,
    algorithm: str,
    publicKey: bytes,
    challenge: bytes,
    exporter: bytes,
    version: int = VERSION,
) -> bytes:
    """
    The exact bytes a proof's signature covers: a domain-separation label, the
    protocol version, the signer's role, its organization, service, algorithm
    name and public key, the challenge the verifier sent (version 1 only:
    version 2 has no challenges, and C{challenge} is ignored), and the TLS
    exporter value of this connection, in that order, each encoded as a
    field.
    """
    claim = (
        SIGNATURE_LABEL,
        bytes([version]),
        role.value,
        org.encode("utf-8"),
        service.encode("utf-8"),
        algorithm.encode("utf-8"),
        publicKey,
    )
    if version == 1:
        return encodeFields(*claim, challenge, exporter)
    return encodeFields(*claim, exporter)
