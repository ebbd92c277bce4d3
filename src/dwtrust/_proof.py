"""
Making and checking the proofs of identity that the handshake exchanges.
"""

from __future__ import annotations

from ._identity import Identity, IdentityError, PeerIdentity, PublicKey, validateName
from ._tls import Channel
from ._wire import VERSION, ErrorCode, Proof, Role, signedPayload


class ProofRejected(Exception):
    """
    A proof failed a check.

    @ivar code: the L{ErrorCode} to refuse with.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def makeProof(
    identity: Identity,
    role: Role,
    challenge: bytes,
    exporter: bytes,
    version: int = VERSION,
) -> Proof:
    """
    Sign C{identity}'s claim for the peer's C{challenge} on the connection
    whose exporter value is C{exporter}, in protocol C{version} (version 2
    has no challenge: pass C{b""}; it is ignored).
    """
    algorithm = identity.algorithm.name
    blob = identity.publicKey.blob
    payload = signedPayload(
        role,
        identity.org,
        identity.service,
        algorithm,
        blob,
        challenge,
        exporter,
        version,
    )
    return Proof(
        identity.org, identity.service, algorithm, blob, identity.sign(payload)
    )


def verifyProof(
    proof: Proof,
    role: Role,
    challenge: bytes,
    channel: Channel,
    version: int = VERSION,
) -> PeerIdentity:
    """
    Check a peer's proof: well-formed names, an algorithm name that matches the
    key, the same key as the peer's TLS certificate, and a valid signature over
    the claim, C{challenge} (which we sent; version 1 only, ignored in
    version 2) and this connection's exporter, in protocol C{version}.

    @param role: the role of the peer that made the proof.
    @raise ProofRejected: naming the first check that failed.
    """
    try:
        validateName("organization", proof.org)
        validateName("service", proof.service)
    except IdentityError as e:
        raise ProofRejected(ErrorCode.protocol_error, str(e)) from None
    key = channel.peerKey
    if proof.publicKey != key.blob or proof.algorithm != key.algorithm.name:
        # The usual case above needs no parsing: the certificate's key was
        # parsed and checked already, and the proof names exactly it.
        # Anything else is parsed, so that the refusal says what is wrong.
        try:
            key = PublicKey.fromWire(proof.algorithm, proof.publicKey)
        except IdentityError as e:
            raise ProofRejected(ErrorCode.bad_signature, str(e)) from None
    if key.blob != channel.peerKey.blob:
        raise ProofRejected(
            ErrorCode.bad_signature,
            "the proof's key is not the key of the peer's TLS certificate",
        )
    payload = signedPayload(
        role,
        proof.org,
        proof.service,
        proof.algorithm,
        proof.publicKey,
        challenge,
        channel.exporter,
        version,
    )
    if not key.verify(proof.signature, payload):
        raise ProofRejected(ErrorCode.bad_signature, "the signature does not verify")
    return PeerIdentity(proof.org, proof.service, key)
