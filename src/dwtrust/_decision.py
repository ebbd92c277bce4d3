"""
Signed decisions: an owner's (or the service's own) statement that a key is
approved, denied, revoked or blocked for a service.

Every decision the trust store holds carries one, and a service acts on a
stored decision only after checking its signature against the keys it trusts
to decide (its registered owners and itself).  Write access to the store alone
therefore cannot mint trust.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from attrs import evolve, frozen
from twisted.logger import Logger

from ._identity import Identity, IdentityError, PeerIdentity, PublicKey
from ._wire import WireError, decodeFields, encodeFields

#: Domain separation: distinct from the handshake's label, so that no
#: handshake signature can ever pass for a decision.
DECISION_LABEL = b"dwtrust-signed-decision"
#: Version 1 decisions (before dwtrust 0.2) name the service only, and have
#: no place in the key's history; they are read, never made.
DECISION_V1 = b"\x01"
#: Version 2: bound to the service's key, and ordered by C{sequence}.
DECISION_VERSION = b"\x02"
_log = Logger()
#: How many verified decisions a L{Signers} remembers.
_MAX_VERIFIED = 10000
STATES = ("approved", "denied", "revoked", "blocked")
#: The state of an owner registration: the service's own statement that a
#: key may decide for it.
OWNER = "owner"
#: An owner's answer to a service router's request for the service's key
#: (see L{dwtrust.provisioning}): hand it over, or not.  Never stored.
KEY_RELEASE_STATES = ("release", "withhold")


class DecisionError(Exception):
    """
    A decision is malformed, or does not verify.
    """


@frozen
class SignedDecision:
    """
    A decision about one key, for one service, and its signature.

    @ivar service: the C{org/service} the decision is for.
    @ivar fingerprint: the subject key's fingerprint.
    @ivar org: the subject's organization.
    @ivar subjectService: the subject's service name.
    @ivar algorithm: the subject key's algorithm name.
    @ivar publicKey: the subject key, OpenSSH wire format.
    @ivar state: C{approved}, C{denied}, C{revoked} or C{blocked}; C{owner}
        for an owner registration; C{release} or C{withhold} for an answer to
        a key request.
    @ivar decidedAt: when, in whole POSIX seconds.
    @ivar reason: why, in the decider's words.
    @ivar signer: the fingerprint of the key that signed.
    @ivar signature: the signature over L{payload}.
    @ivar serviceKey: the fingerprint of the service's own key: the decision
        holds for that service only, not for another with the same name.
        Empty in a version 1 decision.
    @ivar sequence: the decision's place in the history of decisions about
        this key for this service, from 1; a decision with a higher sequence
        replaces one with a lower, never the other way round.  0 in a
        version 1 decision.
    """

    service: str
    fingerprint: str
    org: str
    subjectService: str
    algorithm: str
    publicKey: bytes
    state: str
    decidedAt: int
    reason: str
    signer: str
    signature: bytes
    serviceKey: str = ""
    sequence: int = 0

    @classmethod
    def make(
        cls,
        signer: Identity,
        service: str,
        subject: PeerIdentity,
        state: str,
        decidedAt: float,
        reason: str,
        serviceKey: str,
        sequence: int,
    ) -> SignedDecision:
        """
        Sign a decision about C{subject} for the service named C{service}
        whose key is C{serviceKey}, at place C{sequence} in the key's
        history.
        """
        if state not in (*STATES, OWNER, *KEY_RELEASE_STATES):
            raise DecisionError(f"unknown decision {state!r}")
        if not serviceKey:
            raise DecisionError("a decision must name the service's key")
        if sequence < 1:
            raise DecisionError(f"a decision's sequence starts at 1, not {sequence}")
        unsigned = cls(
            service,
            subject.fingerprint,
            subject.org,
            subject.service,
            subject.algorithm,
            subject.publicKey.blob,
            state,
            math.floor(decidedAt),
            reason,
            signer.fingerprint,
            b"",
            serviceKey,
            sequence,
        )
        return evolve(unsigned, signature=signer.sign(unsigned.payload()))

    @property
    def version(self) -> int:
        return 2 if self.serviceKey else 1

    def _fields(self) -> tuple[bytes, ...]:
        common = (
            self.service.encode(),
            self.fingerprint.encode(),
            self.org.encode(),
            self.subjectService.encode(),
            self.algorithm.encode(),
            self.publicKey,
            self.state.encode(),
            str(self.decidedAt).encode(),
            self.reason.encode(),
            self.signer.encode(),
        )
        if self.version == 1:
            return common
        return (*common, self.serviceKey.encode(), str(self.sequence).encode())

    def payload(self) -> bytes:
        """
        The exact bytes the signature covers.
        """
        version = DECISION_V1 if self.version == 1 else DECISION_VERSION
        return encodeFields(DECISION_LABEL, version, *self._fields())

    def encode(self) -> bytes:
        """
        The decision with its signature, for storage and transport: version
        2 starts with a field holding the version byte; version 1 has none.
        """
        if self.version == 1:
            return encodeFields(*self._fields(), self.signature)
        return encodeFields(DECISION_VERSION, *self._fields(), self.signature)

    @classmethod
    def decode(cls, data: bytes) -> SignedDecision:
        """
        @raise DecisionError: if C{data} is not an encoded decision.
        """
        try:
            if data[:3] == b"\x00\x01" + DECISION_VERSION:
                fields = decodeFields(data, 14)[1:]
            else:
                fields = decodeFields(data, 11)
            text = [f.decode("utf-8") for f in fields[:5]]
            state, decidedAt, reason, signer = (f.decode("utf-8") for f in fields[6:10])
            serviceKey, sequence = "", 0
            if len(fields) == 13:
                serviceKey = fields[10].decode("utf-8")
                sequence = _number(fields[11].decode("utf-8"))
                if not serviceKey or sequence < 1:
                    raise ValueError("no service key, or a sequence below 1")
            return cls(
                text[0],
                text[1],
                text[2],
                text[3],
                text[4],
                fields[5],
                state,
                _number(decidedAt),
                reason,
                signer,
                fields[-1],
                serviceKey,
                sequence,
            )
        except (WireError, UnicodeDecodeError, ValueError) as e:
            raise DecisionError(f"malformed decision: {e}") from None

    def subject(self) -> PeerIdentity:
        """
        The key the decision is about.

        @raise DecisionError: if the key does not parse or does not match the
            fingerprint.
        """
        try:
            key = PublicKey.fromWire(self.algorithm, self.publicKey)
        except IdentityError as e:
            raise DecisionError(str(e)) from None
        if key.fingerprint != self.fingerprint:
            raise DecisionError("the key does not match the fingerprint")
        return PeerIdentity(self.org, self.subjectService, key)


def _number(text: str) -> int:
    """
    A decimal number as the encoding writes them: ASCII digits, a minus sign
    at most, no spaces, no leading zeros, no underscores.
    """
    if text != str(int(text)) or not text.isascii():
        raise ValueError(f"{text!r} is not a canonical decimal number")
    return int(text)


class Signers:
    """
    The keys a service trusts to sign decisions: its owners, and itself.
    """

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[str, PublicKey] = {}
        #: Changes whenever the keys change (what verified may not now).
        self.generation = 0
        #: Decisions that verified, with the keys as they were then.
        self._verified: dict[tuple[bytes, str, str | None], None] = {}
        for key in keys:
            self.add(key)

    def add(self, key: PublicKey) -> None:
        self._keys[key.fingerprint] = key
        self._verified.clear()
        self.generation += 1

    def discard(self, fingerprint: str) -> None:
        """
        Trust the key C{fingerprint} names no longer (on a reload).
        """
        if self._keys.pop(fingerprint, None) is not None:
            self._verified.clear()
            self.generation += 1

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._keys

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def verify(
        self, decision: SignedDecision, service: str, serviceKey: str | None
    ) -> None:
        """
        Check that C{decision} is for C{service}, whose key is C{serviceKey},
        and signed by a trusted key.

        @param serviceKey: the fingerprint of the service's key; L{None}
            accepts a version 1 decision, which does not name it (only for
            reading what was stored before version 2).
        @raise DecisionError: saying which check failed.
        """
        remembered = (decision.encode(), service, serviceKey)
        if remembered in self._verified:
            return
        self._check(decision, service, serviceKey)
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[remembered] = None

    def _check(
        self, decision: SignedDecision, service: str, serviceKey: str | None
    ) -> None:
        if decision.service != service:
            raise DecisionError(
                f"the decision is for {decision.service}, not {service}"
            )
        if decision.version == 1:
            if serviceKey is not None:
                raise DecisionError(
                    "a version 1 decision names no service key and no place in"
                    " the key's history"
                )
        elif decision.serviceKey != serviceKey:
            raise DecisionError(
                f"the decision is for the {decision.service} whose key is"
                f" {decision.serviceKey}, not this one ({serviceKey})"
            )
        signer = self._keys.get(decision.signer)
        if signer is None:
            raise DecisionError(f"{decision.signer} is not a registered owner")
        if not signer.verify(decision.signature, decision.payload()):
            raise DecisionError("the decision's signature does not verify")
        decision.subject()


def readOwnerKey(line: str) -> PeerIdentity:
    """
    An owner from an OpenSSH public-key line, as C{dwtrust keygen} writes
    them (C{ssh-ed25519 AAAA... org/service}); the comment names the owner.

    @raise DecisionError: if the line is not a usable public key.
    """
    try:
        key = PublicKey.fromOpenSSH(line)
    except IdentityError as e:
        raise DecisionError(f"not an owner's public key: {e}") from None
    parts = line.split()
    org, _, service = (parts[2] if len(parts) > 2 else "").partition("/")
    return PeerIdentity(org or "owner", service or key.fingerprint, key)


def registerOwner(service: Identity, owner: PeerIdentity, now: float) -> SignedDecision:
    """
    The service's own signed statement that C{owner} may decide for it.
    """
    return SignedDecision.make(
        service,
        service.name,
        owner,
        OWNER,
        now,
        "registered owner",
        service.fingerprint,
        1,
    )


def registeredOwners(
    service: Identity, registrations: Iterable[bytes]
) -> list[PublicKey]:
    """
    The owner keys among C{registrations} that the service itself signed;
    the others are logged and ignored.
    """
    itself = Signers([service.publicKey])
    owners = []
    for encoded in registrations:
        try:
            registration = SignedDecision.decode(encoded)
            # A registration made before version 2 is the service's own word
            # all the same: only its own key signs them.
            itself.verify(
                registration,
                service.name,
                None if registration.version == 1 else service.fingerprint,
            )
            if registration.state != OWNER:
                raise DecisionError(f"a {registration.state} decision is no owner")
            owners.append(registration.subject().publicKey)
        except DecisionError as e:
            _log.warn(
                "dwtrust: IGNORED an owner registration in the store: {error}",
                event="dwtrust.forged_owner",
                error=str(e),
            )
    return owners
