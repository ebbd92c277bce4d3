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
from cryptography.hazmat.primitives import hashes, serialization
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
    ProofAccept,
    ProofFrame,
    Role,
    WireError,
    encodeFrame,
    signedPayload,
)

from . import independent

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
V2: dict[str, Any] = VECTORS["v2"]
V2_ED25519: dict[str, str] = V2["ed25519"]
V2_ECDSA: dict[str, str] = V2["ecdsa_p256"]
V2_RSA: dict[str, str] = V2["rsa_3072"]

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
    assert isinstance(frame, Challenge | ProofFrame | ProofAccept)
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


# Version 2: no challenges; the exporter is the joint challenge


def _v2Payload(who: Identity, role: Role, exporter: bytes = EXPORTER) -> bytes:
    return signedPayload(
        role,
        who.org,
        who.service,
        who.algorithm.name,
        who.publicKey.blob,
        b"",
        exporter,
        version=2,
    )


def _v2Proof(who: Identity, role: Role) -> Proof:
    return makeProof(who, role, b"", EXPORTER, version=2)


def _v2Channel(exporter: bytes, key: PublicKey) -> Channel:
    return Channel(exporter, key, "TLSv1.3", protocol=2)


def _independentKey(name: str) -> independent.PrivateKey:
    return privateKeyOf(VECTORS["identities"][name])


def _claim(name: str) -> tuple[str, str, str, bytes]:
    vector = VECTORS["identities"][name]
    return (
        vector["org"],
        vector["service"],
        vector["algorithm"],
        unhex(vector["public_key_blob"]),
    )


def _independentV2() -> dict[str, bytes]:
    """
    Every deterministic version 2 value, derived from the specification by
    L{tests.independent} (C{cryptography} alone, no dwtrust code).
    """
    values: dict[str, bytes] = {}
    signers = {
        "ed25519.client": "client_ed25519",
        "ed25519.server": "server_ed25519",
        "ecdsa_p256.client": "client_p256",
        "rsa_3072.server": "server_rsa3072",
    }
    for prefix, name in signers.items():
        group, role = prefix.split(".")
        key = _independentKey(name)
        assert independent.blobOf(key) == _claim(name)[3]
        assert independent.algorithmOf(key) == _claim(name)[2]
        signed = independent.payload(2, role, *_claim(name), EXPORTER)
        values[f"{group}.{role}_payload"] = signed
        if group == "ecdsa_p256":
            continue
        signature = independent.sign(key, signed)
        values[f"{group}.{role}_signature"] = signature
        kind = independent.PROOF if role == "client" else independent.ACCEPT
        values[f"{group}.{'proof' if role == 'client' else 'accept'}_frame"] = (
            independent.frame(2, kind, independent.proofBody(*_claim(name), signature))
        )
    values["ecdsa_p256.proof_frame"] = independent.frame(
        2,
        independent.PROOF,
        independent.proofBody(
            *_claim("client_p256"), unhex(V2_ECDSA["client_signature"])
        ),
    )
    values["ed25519.error_frame"] = independent.frame(
        2,
        independent.ERROR,
        independent.fields(
            ED25519["error_code"].encode("ascii"),
            ED25519["error_message"].encode("utf-8"),
        ),
    )
    return values


def test_v2VectorsIndependent() -> None:
    """
    The version 2 vectors are what the specification's rules give when
    applied without dwtrust's code: every payload, signature and frame is
    derived again with C{cryptography} alone, and the randomized ECDSA
    signature verifies with it.
    """
    derived = _independentV2()
    stored = {
        f"{group}.{label}": value
        for group in ("ed25519", "ecdsa_p256", "rsa_3072")
        for label, value in V2[group].items()
    }
    assert set(stored) - set(derived) == {"ecdsa_p256.client_signature"}
    for label, value in derived.items():
        assert value.hex() == stored[label], label
    key = _independentKey("client_p256").public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(
        unhex(V2_ECDSA["client_signature"]),
        unhex(V2_ECDSA["client_payload"]),
        ec.ECDSA(hashes.SHA256()),
    )


def test_v2PayloadLayout() -> None:
    """
    A version 2 payload is the version 1 payload with the version byte 02
    and without the challenge field: eight fields.
    """
    for label, name, role, challenge in [
        ("client_payload", "client_ed25519", "client", SERVER_CHALLENGE),
        ("server_payload", "server_ed25519", "server", CLIENT_CHALLENGE),
    ]:
        v2 = unhex(V2_ED25519[label])
        v1 = unhex(ED25519[label])
        assert len(independent.decodeFields(v2)) == 8
        assert independent.decodeFields(v2)[1] == b"\x02"
        fieldsV1 = independent.decodeFields(v1)
        assert fieldsV1[7] == challenge
        expected = [*fieldsV1[:1], b"\x02", *fieldsV1[2:7], *fieldsV1[8:]]
        assert independent.decodeFields(v2) == expected
        assert _claim(name)[0].encode() == expected[3], role


def _v2Ed25519Builders() -> dict[str, Callable[[], bytes]]:
    server = identity("server_ed25519")
    client = identity("client_ed25519")
    return {
        "client_payload": lambda: _v2Payload(client, Role.client),
        "client_signature": lambda: _v2Proof(client, Role.client).signature,
        "proof_frame": lambda: encodeFrame(
            ProofFrame(_v2Proof(client, Role.client)), version=2
        ),
        "server_payload": lambda: _v2Payload(server, Role.server),
        "server_signature": lambda: _v2Proof(server, Role.server).signature,
        "accept_frame": lambda: encodeFrame(
            ProofAccept(_v2Proof(server, Role.server)), version=2
        ),
        "error_frame": lambda: encodeFrame(
            Error(ED25519["error_code"], ED25519["error_message"]), version=2
        ),
    }


@pytest.mark.parametrize("label", sorted(_v2Ed25519Builders()))
def test_v2Ed25519Handshake(label: str) -> None:
    """
    Every frame, payload and signature of the version 2 Ed25519 handshake is
    what dwtrust makes from the fixed inputs.
    """
    assert set(_v2Ed25519Builders()) == set(V2_ED25519)
    assert _v2Ed25519Builders()[label]().hex() == V2_ED25519[label]


def test_v2RsaProof() -> None:
    """
    The RSA server's version 2 payload, signature and C{ACCEPT} frame are
    reproduced exactly, and the signature verifies.
    """
    server = identity("server_rsa3072")
    payload = _v2Payload(server, Role.server)
    assert payload.hex() == V2_RSA["server_payload"]
    signature = unhex(V2_RSA["server_signature"])
    assert len(signature) == 384
    assert publicKey("server_rsa3072").verify(signature, payload)
    proof = _v2Proof(server, Role.server)
    assert proof.signature == signature
    assert encodeFrame(ProofAccept(proof), version=2).hex() == V2_RSA["accept_frame"]


def test_v2EcdsaProof() -> None:
    """
    The P-256 client's version 2 payload is reproduced exactly, the vector's
    signature verifies over it (and not over the version 1 payload), and the
    C{PROOF} frame carries it; a fresh signature differs and verifies too.
    """
    client = identity("client_p256")
    payload = _v2Payload(client, Role.client)
    assert payload.hex() == V2_ECDSA["client_payload"]
    signature = unhex(V2_ECDSA["client_signature"])
    key = publicKey("client_p256")
    assert key.verify(signature, payload)
    assert not key.verify(signature, unhex(ECDSA["client_payload"]))
    proof = Proof(
        client.org,
        client.service,
        client.algorithm.name,
        client.publicKey.blob,
        signature,
    )
    assert encodeFrame(ProofFrame(proof), version=2).hex() == V2_ECDSA["proof_frame"]
    fresh = _v2Proof(client, Role.client)
    assert fresh.signature != signature
    assert key.verify(fresh.signature, payload)


def _v2ExpectedFrames() -> dict[str, tuple[str, Frame]]:
    def proof(identityName: str, signature: str) -> Proof:
        return Proof(*_claim(identityName), unhex(signature))

    return {
        "v2.ed25519.proof_frame": (
            V2_ED25519["proof_frame"],
            ProofFrame(proof("client_ed25519", V2_ED25519["client_signature"])),
        ),
        "v2.ed25519.accept_frame": (
            V2_ED25519["accept_frame"],
            ProofAccept(proof("server_ed25519", V2_ED25519["server_signature"])),
        ),
        "v2.ed25519.error_frame": (
            V2_ED25519["error_frame"],
            Error(ED25519["error_code"], ED25519["error_message"]),
        ),
        "v2.ecdsa_p256.proof_frame": (
            V2_ECDSA["proof_frame"],
            ProofFrame(proof("client_p256", V2_ECDSA["client_signature"])),
        ),
        "v2.rsa_3072.accept_frame": (
            V2_RSA["accept_frame"],
            ProofAccept(proof("server_rsa3072", V2_RSA["server_signature"])),
        ),
    }


def decodeOneV2(data: bytes) -> Frame:
    decoder = FrameDecoder(version=2)
    decoder.feed(data)
    frame = decoder.next()
    assert frame is not None
    assert decoder.remainder() == b""
    return frame


@pytest.mark.parametrize("label", sorted(_v2ExpectedFrames()))
def test_v2DecodeFrame(label: str) -> None:
    """
    Each version 2 vector frame decodes, on a version 2 connection, into the
    fields it was made from, whole or one byte at a time, and leaves the bytes
    after it for the application.  On a version 1 connection it is refused as
    another version.
    """
    encoded, expected = _v2ExpectedFrames()[label]
    data = unhex(encoded)
    assert decodeOneV2(data) == expected

    decoder = FrameDecoder(version=2)
    for i, byte in enumerate(data):
        decoder.feed(bytes([byte]))
        frame = decoder.next()
        if i < len(data) - 1:
            assert frame is None
    assert frame == expected

    decoder = FrameDecoder(version=2)
    decoder.feed(data + b"application bytes")
    assert decoder.next() == expected
    assert decoder.remainder() == b"application bytes"

    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(WireError) as raised:
        decoder.next()
    assert raised.value.code is ErrorCode.version_unsupported


def test_v2FramesPerConnection() -> None:
    """
    A version 2 handshake is two frames, C{PROOF} and C{ACCEPT}, and each
    carries the same five fields as a version 1 proof.
    """
    for label in ("proof_frame", "accept_frame"):
        data = unhex(V2_ED25519[label])
        assert data[0] == 2
        assert len(independent.decodeFields(data[4:])) == 5
    assert unhex(V2_ED25519["proof_frame"])[4:] != unhex(ED25519["proof_frame"])[4:]
    assert unhex(V2_ED25519["error_frame"])[1:] == unhex(ED25519["error_frame"])[1:]


#: Each version 2 vector proof: its frame, the role that made it, and the
#: identity whose key is in the prover's TLS certificate.
V2_PROOFS: dict[str, tuple[str, Role, str]] = {
    "v2.ed25519.proof_frame": (
        V2_ED25519["proof_frame"],
        Role.client,
        "client_ed25519",
    ),
    "v2.ed25519.accept_frame": (
        V2_ED25519["accept_frame"],
        Role.server,
        "server_ed25519",
    ),
    "v2.ecdsa_p256.proof_frame": (
        V2_ECDSA["proof_frame"],
        Role.client,
        "client_p256",
    ),
    "v2.rsa_3072.accept_frame": (
        V2_RSA["accept_frame"],
        Role.server,
        "server_rsa3072",
    ),
}


@pytest.mark.parametrize("label", sorted(V2_PROOFS))
def test_v2VerifyProof(label: str) -> None:
    """
    C{verifyProof} accepts each version 2 vector proof on the vector's
    channel, and names the prover.
    """
    encoded, role, certificate = V2_PROOFS[label]
    key = publicKey(certificate)
    peer = verifyProof(
        proofOf(decodeOneV2(unhex(encoded))),
        role,
        b"",
        _v2Channel(EXPORTER, key),
        version=2,
    )
    vector = VECTORS["identities"][certificate]
    assert (peer.org, peer.service) == (vector["org"], vector["service"])
    assert peer.fingerprint == vector["fingerprint"]
    assert peer.publicKey == key


@pytest.mark.parametrize("label", sorted(V2_PROOFS))
def test_v2VerifyProofOtherChannel(label: str) -> None:
    """
    Each version 2 vector proof is refused with C{bad_signature} on a
    channel whose exporter differs in one bit, for the other role, and as a
    version 1 proof, whatever the challenge.
    """
    encoded, role, certificate = V2_PROOFS[label]
    proof = proofOf(decodeOneV2(unhex(encoded)))
    key = publicKey(certificate)
    otherRole = Role.client if role is Role.server else Role.server
    attempts: list[tuple[Role, bytes, Channel, int]] = [
        (role, b"", _v2Channel(exporter, key), 2) for exporter in flippedExporters()
    ]
    attempts.append((otherRole, b"", _v2Channel(EXPORTER, key), 2))
    for challenge in (CLIENT_CHALLENGE, SERVER_CHALLENGE, b""):
        attempts.append((role, challenge, Channel(EXPORTER, key, "TLSv1.3"), 1))
    for attemptRole, challenge, channel, version in attempts:
        with pytest.raises(ProofRejected) as raised:
            verifyProof(proof, attemptRole, challenge, channel, version=version)
        assert raised.value.code is ErrorCode.bad_signature


def test_v1ProofsRefusedInV2() -> None:
    """
    The version 1 vector proofs, replayed in version 2 (as the same frame
    type with the header's version 2), are refused with C{bad_signature}:
    the version byte and the challenge are in what they signed.
    """
    for encoded, role, _, certificate in PROOFS.values():
        proof = proofOf(decodeOne(unhex(encoded)))
        with pytest.raises(ProofRejected) as raised:
            verifyProof(
                proof,
                role,
                b"",
                _v2Channel(EXPORTER, publicKey(certificate)),
                version=2,
            )
        assert raised.value.code is ErrorCode.bad_signature


@pytest.mark.parametrize("name", sorted(V2["rejected_frames"]))
def test_v2RejectedFrame(name: str) -> None:
    """
    Each version 2 rejected frame, the first frame on a version 2
    connection, makes the decoder fail with the vector's error code without
    waiting for more bytes.
    """
    vector = V2["rejected_frames"][name]
    decoder = FrameDecoder(version=2)
    decoder.feed(unhex(vector["frame"]))
    with pytest.raises(WireError) as raised:
        decoder.next()
    assert raised.value.code is ErrorCode(vector["error"])


def test_v2RejectedFramesLater() -> None:
    """
    After a good first frame, a frame of another version is a
    C{protocol_error}, not C{version_unsupported}.
    """
    for other in ("version_1", "version_3"):
        decoder = FrameDecoder(version=2)
        decoder.feed(unhex(V2_ED25519["error_frame"]))
        assert decoder.next() is not None
        decoder.feed(unhex(V2["rejected_frames"][other]["frame"]))
        with pytest.raises(WireError) as raised:
            decoder.next()
        assert raised.value.code is ErrorCode.protocol_error


@pytest.mark.parametrize("name", sorted(V2["rejected_proofs"]))
def test_v2RejectedProof(name: str) -> None:
    """
    Each version 2 rejected proof decodes, and C{verifyProof} refuses it in
    version 2 with the vector's error code.
    """
    vector = V2["rejected_proofs"][name]
    proof = proofOf(decodeOneV2(unhex(vector["frame"])))
    with pytest.raises(ProofRejected) as raised:
        verifyProof(
            proof,
            Role(vector["prover_role"].encode("ascii")),
            b"",
            _v2Channel(unhex(vector["exporter"]), publicKey(vector["certificate"])),
            version=2,
        )
    assert raised.value.code is ErrorCode(vector["error"])


def test_v2RejectedProofsSignedCorrectly() -> None:
    """
    Apart from the defect each describes, every version 2 rejected proof is
    signed by its key over what it says it signs: the refusal comes from the
    check named, not from a broken vector.
    """
    key = publicKey("client_ed25519")
    proofs = V2["rejected_proofs"]

    def signature(name: str) -> bytes:
        return proofOf(decodeOneV2(unhex(proofs[name]["frame"]))).signature

    claim = _claim("client_ed25519")
    assert key.verify(signature("v1_signature"), unhex(ED25519["client_payload"]))
    assert key.verify(
        signature("nine_fields"),
        independent.payload(2, "client", *claim, EXPORTER, challenge=SERVER_CHALLENGE),
    )
    assert key.verify(
        signature("reflected_role"), independent.payload(2, "client", *claim, EXPORTER)
    )
    assert key.verify(
        signature("upper_case_org"),
        independent.payload(2, "client", "Acme", *claim[1:], EXPORTER),
    )
    for name in ("other_connection", "not_certificate_key"):
        assert proofs[name]["frame"] == V2_ED25519["proof_frame"]


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
    frames |= {f"v2.ed25519.{k}" for k in V2_ED25519 if k.endswith("_frame")}
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
