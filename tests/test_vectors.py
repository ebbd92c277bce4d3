"""
The test vectors of C{docs/protocol.rst}, checked against the code.

C{tests/vectors.json} holds the vectors.  These tests rebuild every key,
payload, signature and frame from the fixed inputs with dwtrust's own
functions and compare them byte for byte, decode every frame, verify every
proof, and check that each rejected frame and proof is refused with its error
code.  They also read the vectors back out of C{docs/protocol.rst}, so that the
specification, the JSON file and the code cannot drift apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from dwtrust._identity import (
    ALGORITHMS,
    Identity,
    PrivateKey,
    PublicKey,
    fingerprintOf,
)
from dwtrust._proof import ProofRejected, makeProof, verifyProof
from dwtrust._tls import Channel
from dwtrust._wire import (
    EXPORTER_LABEL,
    MAX_BODY,
    SIGNATURE_LABEL,
    Accept,
    Challenge,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    Proof,
    ProofFrame,
    Role,
    WireError,
    encodeFrame,
    signedPayload,
)

HERE = Path(__file__).resolve().parent
VECTORS: dict[str, Any] = json.loads((HERE / "vectors.json").read_text("utf-8"))
PROTOCOL_RST = HERE.parent / "docs" / "protocol.rst"

INPUTS: dict[str, str] = VECTORS["inputs"]
CLIENT_CHALLENGE = bytes.fromhex(INPUTS["client_challenge"])
SERVER_CHALLENGE = bytes.fromhex(INPUTS["server_challenge"])
EXPORTER = bytes.fromhex(INPUTS["exporter"])
ED25519: dict[str, str] = VECTORS["ed25519"]
ECDSA: dict[str, str] = VECTORS["ecdsa_p256"]
RSA: dict[str, str] = VECTORS["rsa_3072"]

#: Vectors that the code does not meet yet, and why.  Each is a known defect;
#: strict xfail makes the test fail once it is fixed, so the mark goes then.
KNOWN_DEFECTS: dict[str, str] = {}


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)


def privateKeyOf(vector: dict[str, str]) -> PrivateKey:
    """
    The private key of an identity vector, from whichever form it gives.
    """
    if "seed" in vector:
        return ed25519.Ed25519PrivateKey.from_private_bytes(unhex(vector["seed"]))
    if "private_scalar" in vector:
        return ec.derive_private_key(int(vector["private_scalar"], 16), ec.SECP256R1())
    key = serialization.load_pem_private_key(
        vector["private_key_pkcs8_pem"].encode("ascii"), None
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def identity(name: str) -> Identity:
    vector = VECTORS["identities"][name]
    return Identity.fromPrivateKey(
        vector["org"], vector["service"], privateKeyOf(vector)
    )


def publicKey(name: str) -> PublicKey:
    vector = VECTORS["identities"][name]
    return PublicKey.fromWire(vector["algorithm"], unhex(vector["public_key_blob"]))


def decodeOne(data: bytes) -> Frame:
    """
    Decode C{data}, which must be exactly one frame.
    """
    decoder = FrameDecoder()
    decoder.feed(data)
    frame = decoder.next()
    assert frame is not None
    assert decoder.remainder() == b""
    return frame


def proofOf(frame: Frame) -> Proof:
    assert isinstance(frame, Challenge | ProofFrame)
    return frame.proof


# Keys and identities


@pytest.mark.parametrize("name", sorted(VECTORS["identities"]))
def test_identity(name: str) -> None:
    """
    Each identity's private key gives the vector's public key blob, OpenSSH
    line and fingerprint, and the blob and line parse back to the same key.
    """
    vector = VECTORS["identities"][name]
    made = identity(name)
    blob = unhex(vector["public_key_blob"])
    assert made.algorithm.name == vector["algorithm"]
    assert made.publicKey.blob == blob
    assert made.publicKey.openssh() == vector["openssh"]
    assert made.fingerprint == vector["fingerprint"]
    assert fingerprintOf(blob) == vector["fingerprint"]
    assert PublicKey.fromWire(vector["algorithm"], blob) == made.publicKey
    assert PublicKey.fromOpenSSH(vector["openssh"] + " a comment") == made.publicKey


# Building every value from the fixed inputs


def _ed25519Builders() -> dict[str, Callable[[], bytes]]:
    server = identity("server_ed25519")
    client = identity("client_ed25519")

    def payload(who: Identity, role: Role, challenge: bytes) -> bytes:
        return signedPayload(
            role,
            who.org,
            who.service,
            who.algorithm.name,
            who.publicKey.blob,
            challenge,
            EXPORTER,
        )

    def serverProof() -> Proof:
        return makeProof(server, Role.server, CLIENT_CHALLENGE, EXPORTER)

    def clientProof() -> Proof:
        return makeProof(client, Role.client, SERVER_CHALLENGE, EXPORTER)

    return {
        "hello_frame": lambda: encodeFrame(Hello(CLIENT_CHALLENGE)),
        "server_payload": lambda: payload(server, Role.server, CLIENT_CHALLENGE),
        "server_signature": lambda: serverProof().signature,
        "challenge_frame": lambda: encodeFrame(
            Challenge(SERVER_CHALLENGE, serverProof())
        ),
        "client_payload": lambda: payload(client, Role.client, SERVER_CHALLENGE),
        "client_signature": lambda: clientProof().signature,
        "proof_frame": lambda: encodeFrame(ProofFrame(clientProof())),
        "accept_frame": lambda: encodeFrame(Accept()),
        "error_frame": lambda: encodeFrame(
            Error(ED25519["error_code"], ED25519["error_message"])
        ),
    }


@pytest.mark.parametrize("label", sorted(_ed25519Builders()))
def test_ed25519Handshake(label: str) -> None:
    """
    Every frame, payload and signature of the Ed25519 handshake is what
    dwtrust makes from the fixed inputs.  (Ed25519 is deterministic.)
    """
    assert _ed25519Builders()[label]().hex() == ED25519[label]


def test_errorFrameCode() -> None:
    """
    The vector's error code is one this version knows.
    """
    assert ErrorCode(ED25519["error_code"]) is ErrorCode.denied


def test_rsaProof() -> None:
    """
    RSASSA-PKCS1-v1_5 is deterministic: the RSA server's payload, signature
    and C{CHALLENGE} frame are reproduced exactly, and the signature verifies.
    """
    server = identity("server_rsa3072")
    payload = signedPayload(
        Role.server,
        server.org,
        server.service,
        server.algorithm.name,
        server.publicKey.blob,
        CLIENT_CHALLENGE,
        EXPORTER,
    )
    assert payload.hex() == RSA["server_payload"]
    signature = unhex(RSA["server_signature"])
    assert len(signature) == 384
    assert publicKey("server_rsa3072").verify(signature, payload)
    proof = makeProof(server, Role.server, CLIENT_CHALLENGE, EXPORTER)
    assert proof.signature == signature
    assert (
        encodeFrame(Challenge(SERVER_CHALLENGE, proof)).hex() == RSA["challenge_frame"]
    )


def test_ecdsaProof() -> None:
    """
    ECDSA is randomized: the P-256 client's payload is reproduced exactly,
    the vector's signature verifies over it, and the C{PROOF} frame is that
    payload's claim with that signature.  A fresh signature differs, and
    verifies too.
    """
    client = identity("client_p256")
    payload = signedPayload(
        Role.client,
        client.org,
        client.service,
        client.algorithm.name,
        client.publicKey.blob,
        SERVER_CHALLENGE,
        EXPORTER,
    )
    assert payload.hex() == ECDSA["client_payload"]
    signature = unhex(ECDSA["client_signature"])
    key = publicKey("client_p256")
    assert key.verify(signature, payload)
    assert not key.verify(signature, payload + b"\x00")
    proof = Proof(
        client.org,
        client.service,
        client.algorithm.name,
        client.publicKey.blob,
        signature,
    )
    assert encodeFrame(ProofFrame(proof)).hex() == ECDSA["proof_frame"]
    fresh = makeProof(client, Role.client, SERVER_CHALLENGE, EXPORTER)
    assert fresh.signature != signature
    assert key.verify(fresh.signature, payload)


# Decoding the vector frames


def _expectedFrames() -> dict[str, tuple[str, Frame]]:
    def proof(identityName: str, signature: str) -> Proof:
        vector = VECTORS["identities"][identityName]
        return Proof(
            vector["org"],
            vector["service"],
            vector["algorithm"],
            unhex(vector["public_key_blob"]),
            unhex(signature),
        )

    return {
        "ed25519.hello_frame": (ED25519["hello_frame"], Hello(CLIENT_CHALLENGE)),
        "ed25519.challenge_frame": (
            ED25519["challenge_frame"],
            Challenge(
                SERVER_CHALLENGE,
                proof("server_ed25519", ED25519["server_signature"]),
            ),
        ),
        "ed25519.proof_frame": (
            ED25519["proof_frame"],
            ProofFrame(proof("client_ed25519", ED25519["client_signature"])),
        ),
        "ed25519.accept_frame": (ED25519["accept_frame"], Accept()),
        "ed25519.error_frame": (
            ED25519["error_frame"],
            Error(ED25519["error_code"], ED25519["error_message"]),
        ),
        "ecdsa_p256.proof_frame": (
            ECDSA["proof_frame"],
            ProofFrame(proof("client_p256", ECDSA["client_signature"])),
        ),
        "rsa_3072.challenge_frame": (
            RSA["challenge_frame"],
            Challenge(
                SERVER_CHALLENGE,
                proof("server_rsa3072", RSA["server_signature"]),
            ),
        ),
    }


@pytest.mark.parametrize("label", sorted(_expectedFrames()))
def test_decodeFrame(label: str) -> None:
    """
    Each vector frame decodes into the fields it was made from, whether it
    arrives whole or one byte at a time, and the bytes after it are left for
    the application.
    """
    encoded, expected = _expectedFrames()[label]
    data = unhex(encoded)
    assert decodeOne(data) == expected

    decoder = FrameDecoder()
    for i, byte in enumerate(data):
        decoder.feed(bytes([byte]))
        frame = decoder.next()
        if i < len(data) - 1:
            assert frame is None
    assert frame == expected

    decoder = FrameDecoder()
    decoder.feed(data + b"application bytes")
    assert decoder.next() == expected
    assert decoder.remainder() == b"application bytes"


def test_decodeErrorFrame() -> None:
    """
    The vector C{ERROR} frame reads as the code C{denied}.
    """
    frame = decodeOne(unhex(ED25519["error_frame"]))
    assert isinstance(frame, Error)
    assert frame.errorCode is ErrorCode.denied
    assert frame.message == "unknown key"


# Verifying the vector proofs


#: Each vector proof: its frame, the role that made it, the challenge it
#: signs (the one its verifier sent), and the identity whose key is in the
#: prover's TLS certificate.
PROOFS: dict[str, tuple[str, Role, bytes, str]] = {
    "ed25519.challenge_frame": (
        ED25519["challenge_frame"],
        Role.server,
        CLIENT_CHALLENGE,
        "server_ed25519",
    ),
    "ed25519.proof_frame": (
        ED25519["proof_frame"],
        Role.client,
        SERVER_CHALLENGE,
        "client_ed25519",
    ),
    "ecdsa_p256.proof_frame": (
        ECDSA["proof_frame"],
        Role.client,
        SERVER_CHALLENGE,
        "client_p256",
    ),
    "rsa_3072.challenge_frame": (
        RSA["challenge_frame"],
        Role.server,
        CLIENT_CHALLENGE,
        "server_rsa3072",
    ),
}


def flippedExporters() -> Iterator[bytes]:
    for position in (0, len(EXPORTER) // 2, len(EXPORTER) - 1):
        flipped = bytearray(EXPORTER)
        flipped[position] ^= 0x01
        yield bytes(flipped)


@pytest.mark.parametrize("label", sorted(PROOFS))
def test_verifyProof(label: str) -> None:
    """
    C{verifyProof} accepts each vector proof on the vector's channel, and
    names the prover.
    """
    encoded, role, challenge, certificate = PROOFS[label]
    key = publicKey(certificate)
    peer = verifyProof(
        proofOf(decodeOne(unhex(encoded))),
        role,
        challenge,
        Channel(EXPORTER, key, "TLSv1.3"),
    )
    vector = VECTORS["identities"][certificate]
    assert (peer.org, peer.service) == (vector["org"], vector["service"])
    assert peer.algorithm == vector["algorithm"]
    assert peer.fingerprint == vector["fingerprint"]
    assert peer.publicKey == key


@pytest.mark.parametrize("label", sorted(PROOFS))
def test_verifyProofOtherChannel(label: str) -> None:
    """
    Each vector proof is refused with C{bad_signature} on a channel whose
    exporter value differs in one bit, for the other role, or for another
    challenge.
    """
    encoded, role, challenge, certificate = PROOFS[label]
    proof = proofOf(decodeOne(unhex(encoded)))
    key = publicKey(certificate)
    otherRole = Role.client if role is Role.server else Role.server
    attempts = [
        (role, challenge, Channel(exporter, key, "TLSv1.3"))
        for exporter in flippedExporters()
    ]
    attempts.append((otherRole, challenge, Channel(EXPORTER, key, "TLSv1.3")))
    attempts.append(
        (role, bytes(reversed(challenge)), Channel(EXPORTER, key, "TLSv1.3"))
    )
    for attemptRole, attemptChallenge, channel in attempts:
        with pytest.raises(ProofRejected) as raised:
            verifyProof(proof, attemptRole, attemptChallenge, channel)
        assert raised.value.code is ErrorCode.bad_signature


# What must be refused


@pytest.mark.parametrize("name", sorted(VECTORS["rejected_frames"]))
def test_rejectedFrame(name: str) -> None:
    """
    Each rejected frame makes the decoder fail with the vector's error code,
    without waiting for more bytes.
    """
    vector = VECTORS["rejected_frames"][name]
    decoder = FrameDecoder()
    decoder.feed(unhex(vector["frame"]))
    with pytest.raises(WireError) as raised:
        decoder.next()
    assert raised.value.code is ErrorCode(vector["error"])


def _rejectedProofCases() -> list[Any]:
    cases = []
    for name in sorted(VECTORS["rejected_proofs"]):
        marks = []
        if name in KNOWN_DEFECTS:
            marks.append(pytest.mark.xfail(reason=KNOWN_DEFECTS[name], strict=True))
        cases.append(pytest.param(name, marks=marks, id=name))
    return cases


@pytest.mark.parametrize("name", _rejectedProofCases())
def test_rejectedProof(name: str) -> None:
    """
    Each rejected proof decodes, and C{verifyProof} refuses it with the
    vector's error code.
    """
    vector = VECTORS["rejected_proofs"][name]
    proof = proofOf(decodeOne(unhex(vector["frame"])))
    channel = Channel(
        unhex(vector["exporter"]), publicKey(vector["certificate"]), "TLSv1.3"
    )
    with pytest.raises(ProofRejected) as raised:
        verifyProof(
            proof,
            Role(vector["prover_role"].encode("ascii")),
            unhex(vector["challenge"]),
            channel,
        )
    assert raised.value.code is ErrorCode(vector["error"])


# The specification shows the same vectors


#: A label line in a vector block: C{dotted.name:} and maybe a value.
_LABEL = re.compile(r"^([a-z0-9_]+(?:\.[a-z0-9_]+)+):(?: (.*))?$")
#: A row of an annotated dump: hex bytes, then maybe a note.
_ROW = re.compile(r"^((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:  .*)?$")


def codeBlocks(text: str) -> Iterator[tuple[str, list[str]]]:
    """
    The C{:class:} and the dedented lines of each C{code-block} that has one.
    """
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start = re.match(r"^( *)\.\. code-block::", lines[i])
        i += 1
        if start is None:
            continue
        indent = len(start.group(1))
        options: dict[str, str] = {}
        while i < len(lines) and (option := re.match(r"^ +:(\w+):\s*(.*)$", lines[i])):
            options[option.group(1)] = option.group(2)
            i += 1
        content = []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            content.append(lines[i])
            i += 1
        while content and not content[-1].strip():
            content.pop()
        while content and not content[0].strip():
            content.pop(0)
        if "class" in options and content:
            margin = min(len(c) - len(c.lstrip()) for c in content if c.strip())
            yield options["class"], [c[margin:] for c in content]


def labelledValues(lines: list[str]) -> Iterator[tuple[str, str]]:
    """
    The values of a C{dwtrust-vectors} block: C{label: value} on one line, or
    C{label:} and the value on more-indented lines, joined (with line feeds
    for PEM, without anything otherwise).
    """
    label: str | None = None
    parts: list[str] = []

    def value() -> str:
        assert label is not None
        if label.endswith("_pem"):
            return "\n".join(parts) + "\n"
        return "".join(parts)

    for line in lines:
        if not line.strip():
            continue
        if line.startswith(" "):
            assert label is not None, f"a value with no label: {line!r}"
            parts.append(line.strip())
            continue
        if label is not None:
            yield label, value()
            label = None
        match = _LABEL.match(line)
        assert match is not None, f"not a label line: {line!r}"
        if match.group(2) is not None:
            yield match.group(1), match.group(2)
        else:
            label, parts = match.group(1), []
    if label is not None:
        yield label, value()


def annotatedBytes(lines: list[str]) -> tuple[str, str]:
    """
    The label and the hex bytes of a C{dwtrust-annotated} dump.
    """
    match = _LABEL.match(lines[0])
    assert match is not None and match.group(2) is None, lines[0]
    data = []
    for line in lines[1:]:
        row = _ROW.match(line.strip())
        assert row is not None, f"not a dump row: {line!r}"
        data.append(row.group(1).replace(" ", ""))
    return match.group(1), "".join(data)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            assert isinstance(value, str)
            flat[f"{prefix}{key}"] = value
    return flat


def specification() -> str:
    return PROTOCOL_RST.read_text("utf-8")


def test_specificationShowsEveryVector() -> None:
    """
    The vector blocks of C{docs/protocol.rst} hold exactly the values of
    C{tests/vectors.json}: each one once, none missing, none different.
    """
    shown: dict[str, str] = {}
    for cls, lines in codeBlocks(specification()):
        if cls != "dwtrust-vectors":
            continue
        for label, value in labelledValues(lines):
            assert label not in shown, f"{label} is shown twice"
            shown[label] = value
    expected = flatten({k: v for k, v in VECTORS.items() if k != "comment"})
    descriptions = {k: v for k, v in expected.items() if k.endswith(".description")}
    assert shown == {k: v for k, v in expected.items() if k not in descriptions}
    # The descriptions are prose, not vector blocks.
    prose = " ".join(specification().split())
    for label, description in descriptions.items():
        assert " ".join(description.split()) in prose, label


def test_specificationDumps() -> None:
    """
    The annotated dumps of C{docs/protocol.rst} hold the bytes of the vectors
    they are labelled with, and every Ed25519 frame has one.
    """
    expected = flatten({k: v for k, v in VECTORS.items() if k != "comment"})
    dumped = dict(
        annotatedBytes(lines)
        for cls, lines in codeBlocks(specification())
        if cls == "dwtrust-annotated"
    )
    for label, data in dumped.items():
        assert data == expected[label], label
    frames = {f"ed25519.{k}" for k in ED25519 if k.endswith("_frame")}
    assert frames <= set(dumped)


def test_specificationConstants() -> None:
    """
    The constants the specification states are the code's.
    """
    text = specification()
    assert f"``{EXPORTER_LABEL.decode('ascii')}``" in text
    assert f"``{SIGNATURE_LABEL.decode('ascii')}``" in text
    assert f"the {len(SIGNATURE_LABEL)} ASCII bytes" in text
    assert f"the {len(EXPORTER_LABEL)} ASCII bytes" in text
    assert f"at most {MAX_BODY} bytes" in text
    for code in ErrorCode:
        assert f"   * - ``{code.value}``" in text, code
    for algorithm in ALGORITHMS.values():
        assert f"``{algorithm.name}``" in text
        assert f"``{algorithm.keyType}``" in text
