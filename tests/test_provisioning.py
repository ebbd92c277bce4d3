"""
Fast, in-process tests for L{dwtrust.provisioning}: join tokens
(L{JoinToken}, L{JoinTokens}), the key requests a service router makes
(L{KeyRequests}), the provisioning commands on the control channel (in
memory, over real TLS and the real handshake), and L{clone} and
L{requestKey} over real loopback TCP in this process.

The real-process end-to-end tests are in C{test_clone.py} and
C{test_router.py}.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import IOPump
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import (
    Authenticator,
    ErrorCode,
    HandshakeFailed,
    Identity,
    IdentityError,
    PeerIdentity,
    PinningPolicy,
)
from dwtrust._decision import SignedDecision, Signers, registerOwner
from dwtrust._identity import PRIVATE_KEY_FILE
from dwtrust._wire import encodeFields
from dwtrust._wrap import STORE_FILE
from dwtrust.control import (
    ControlBus,
    ControlMessage,
    ControlPolicy,
    ControlProtocol,
    Decide,
    DecisionRefused,
    ListPeers,
    ListPending,
    NotAnOwner,
    Watch,
    controlFactory,
)
from dwtrust.control._protocol import PAGE_BYTES
from dwtrust.provisioning import (
    JoinError,
    JoinRefused,
    JoinToken,
    JoinTokens,
    KeyRequestRefused,
    KeyRequests,
    Provisioning,
    clone,
    requestKey,
)
from dwtrust.provisioning._commands import (
    CollectKey,
    IssueJoinToken,
    Join,
    RequestKey,
    ServiceRecords,
)
from dwtrust.provisioning._server import RELEASE_SKEW, KeyRequest, recordsPage
from dwtrust.provisioning._tokens import (
    _REMEMBER,
    MAX_TOKEN_TTL,
    MAX_TOKENS,
    MAX_WRONG_PROOFS,
    SECRET_BYTES,
    TOKEN_PREFIX,
    tokenIdOf,
)
from dwtrust.store import KeyState, SQLiteStore
from dwtrust.testing import MemoryTrustStore, connectInMemory, recordDecision

from .deciding import decisionsFor, sign
from .helpers import flushAll, makeIdentity, temporaryDirectory

T = TypeVar("T")

reactor: Any = _reactor

SERVICE = "acme/ledger"
NOW = 1_700_000_000.0
ENDPOINT = "tcp:host=ledger.example:port=7444"
FINGERPRINT = "SHA256:" + "A" * 43


def peerOf(identity: Identity) -> PeerIdentity:
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


def observe(case: SynchronousTestCase) -> EventLoggingObserver:
    """
    Record every log event until C{case} ends.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def eventsNamed(observer: EventLoggingObserver, name: str) -> list[dict[str, Any]]:
    return [dict(e) for e in observer if e.get("event") == name]


def bodyOf(*fields: bytes) -> str:
    """
    A token's text form around C{fields}, however many there are.
    """
    encoded = base64.urlsafe_b64encode(encodeFields(*fields)).decode().rstrip("=")
    return TOKEN_PREFIX + encoded


# Join tokens


class JoinTokenTests(SynchronousTestCase):
    """
    L{JoinToken}: its text form, its public name and its proof.
    """

    def token(self, secret: bytes | None = None) -> JoinToken:
        return JoinToken(
            ENDPOINT,
            FINGERPRINT,
            secret if secret is not None else os.urandom(SECRET_BYTES),
            int(NOW) + 600,
        )

    def assertDamaged(self, text: str, *words: str) -> None:
        error = self.assertRaises(JoinError, JoinToken.parse, text)
        self.assertNotIsInstance(error, JoinRefused)
        for word in words or ("damaged",):
            self.assertIn(word, str(error))

    def test_roundTrip(self) -> None:
        """
        A token parses back from its text form, which starts with the
        versioned prefix; surrounding space is ignored.
        """
        token = self.token()
        text = token.encode()
        self.assertTrue(text.startswith(TOKEN_PREFIX))
        self.assertNotIn("=", text)
        self.assertEqual(JoinToken.parse(text), token)
        self.assertEqual(JoinToken.parse(f"  {text}\n"), token)

    def test_roundTripUnicodeEndpoint(self) -> None:
        token = JoinToken("unix:/srv/lédger/control.sock", FINGERPRINT, b"s" * 32, 7)
        self.assertEqual(JoinToken.parse(token.encode()), token)

    def test_wrongPrefix(self) -> None:
        """
        Text that is not a join token of this version is refused, and the
        message says what a token starts with.
        """
        text = self.token().encode()
        for wrong in [
            text.replace("dwtrust-join-1.", "dwtrust-join-2.", 1),
            text[len(TOKEN_PREFIX) :],
            "",
            "ssh-ed25519 AAAA",
        ]:
            self.assertDamaged(wrong, "not a dwtrust join token", TOKEN_PREFIX)

    def test_damagedBase64(self) -> None:
        """
        Base64 that does not decode (a stray character left over, or
        characters outside ASCII) is refused as damaged.
        """
        text = self.token().encode()
        body = text[len(TOKEN_PREFIX) :]
        extra = "A" * ((1 - len(body)) % 4 or 4)
        self.assertEqual((len(body) + len(extra)) % 4, 1)
        self.assertDamaged(text + extra)
        self.assertDamaged(text[:20] + "é" + text[21:])

    def test_truncated(self) -> None:
        """
        A token cut short, or holding too few or too many fields, is refused
        as damaged.
        """
        text = self.token().encode()
        for length in [len(TOKEN_PREFIX) + 4, len(text) // 2, len(text) - 4]:
            self.assertDamaged(text[:length])
        self.assertDamaged(
            bodyOf(ENDPOINT.encode(), FINGERPRINT.encode(), b"s" * SECRET_BYTES)
        )
        self.assertDamaged(
            bodyOf(ENDPOINT.encode(), FINGERPRINT.encode(), b"s" * 32, b"1", b"x")
        )

    def test_expiresNotANumber(self) -> None:
        self.assertDamaged(
            bodyOf(ENDPOINT.encode(), FINGERPRINT.encode(), b"s" * 32, b"soon")
        )

    def test_secretLength(self) -> None:
        """
        A secret shorter or longer than L{SECRET_BYTES} is refused.
        """
        for secret in [b"", b"s" * (SECRET_BYTES - 1), b"s" * (SECRET_BYTES + 1)]:
            self.assertDamaged(self.token(secret).encode())

    def test_fingerprintWithoutAlgorithm(self) -> None:
        """
        A fingerprint must be a C{SHA256:} one.
        """
        for fingerprint in ["A" * 43, "MD5:" + "A" * 43, ""]:
            token = JoinToken(ENDPOINT, fingerprint, b"s" * 32, 1)
            self.assertDamaged(token.encode())

    def test_emptyEndpoint(self) -> None:
        token = JoinToken("", FINGERPRINT, b"s" * 32, 1)
        self.assertDamaged(token.encode(), "names no instance")

    def test_reprHidesSecret(self) -> None:
        """
        A token's C{repr} (what a traceback or a log shows) holds no form of
        its secret, but does name the instance to dial.
        """
        secret = bytes(range(SECRET_BYTES))
        token = self.token(secret)
        text = repr(token)
        self.assertIn(ENDPOINT, text)
        for form in [
            repr(secret),
            secret.hex(),
            base64.b64encode(secret).decode()[:20],
            base64.urlsafe_b64encode(secret).decode()[:20],
        ]:
            self.assertNotIn(form, text)
        self.assertNotIn("secret", text)

    def test_tokenIdDeterministic(self) -> None:
        """
        The token's id depends on its secret alone: the same for the same
        secret, different for another; it does not reveal the secret.
        """
        secret = b"\x01" * SECRET_BYTES
        token = self.token(secret)
        again = JoinToken("unix:/other", FINGERPRINT, secret, 1)
        self.assertEqual(token.tokenId, again.tokenId)
        self.assertEqual(token.tokenId, tokenIdOf(secret))
        self.assertEqual(len(token.tokenId), 32)
        self.assertNotEqual(token.tokenId, self.token(b"\x02" * 32).tokenId)
        self.assertNotIn(token.tokenId, secret.hex())
        self.assertNotIn(secret.hex()[:16], token.tokenId)

    def test_proofBindsBothKeys(self) -> None:
        """
        The proof is the same for the same two keys, and changes when
        either changes, or with another secret.
        """
        token = self.token(b"\x03" * SECRET_BYTES)
        service, instance = "SHA256:service", "SHA256:instance"
        proof = token.proof(service, instance)
        self.assertEqual(proof, token.proof(service, instance))
        self.assertEqual(len(proof), 32)
        others = {
            token.proof("SHA256:other", instance),
            token.proof(service, "SHA256:other"),
            token.proof(instance, service),
            self.token(b"\x04" * SECRET_BYTES).proof(service, instance),
        }
        self.assertNotIn(proof, others)
        self.assertEqual(len(others), 4)
        self.assertNotIn(token.secret, proof)


class JoinTokensTests(SynchronousTestCase):
    """
    L{JoinTokens}: a running instance's one-time, expiring tokens.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = "SHA256:service"
        self.instance = "SHA256:instance"
        self.owner = "SHA256:owner"
        self.tokens = JoinTokens(self.service, self.clock.seconds)

    def issue(self, ttl: float = 600.0) -> tuple[str, bytes, int]:
        return self.tokens.issue(ttl, self.owner)

    def proof(self, secret: bytes, instance: str | None = None) -> bytes:
        return JoinToken(ENDPOINT, self.service, secret, 0).proof(
            self.service, instance or self.instance
        )

    def assertRefused(
        self, tokenId: str, proof: bytes, word: str, instance: str | None = None
    ) -> None:
        error = self.assertRaises(
            JoinRefused,
            self.tokens.redeem,
            tokenId,
            proof,
            instance or self.instance,
        )
        self.assertIn(word, str(error))

    def test_issue(self) -> None:
        """
        A token is a fresh 256-bit secret, named by its id, lapsing C{ttl}
        seconds from now (in whole seconds).
        """
        tokenId, secret, expires = self.issue(90.5)
        self.assertEqual(len(secret), SECRET_BYTES)
        self.assertEqual(tokenId, tokenIdOf(secret))
        self.assertEqual(expires, math.floor(NOW + 90.5))
        other = self.issue()
        self.assertNotEqual(other[1], secret)

    def test_redeemOnce(self) -> None:
        """
        The right proof redeems a token once, and answers with the issuing
        owner; the second time it is refused as used, even by the same
        instance with the same proof.
        """
        tokenId, secret, _ = self.issue()
        proof = self.proof(secret)
        self.assertEqual(self.tokens.redeem(tokenId, proof, self.instance), self.owner)
        self.assertRefused(tokenId, proof, "already used")

    def test_expired(self) -> None:
        """
        A token redeemed at or after its expiry is refused as expired, and
        the message says when.
        """
        tokenId, secret, expires = self.issue(60)
        self.clock.advance(59)
        self.clock.advance(expires - self.clock.seconds())
        self.assertRefused(tokenId, self.proof(secret), "expired")
        self.assertRefused(tokenId, self.proof(secret), "2023-11-14")

    def test_notYetExpired(self) -> None:
        tokenId, secret, _ = self.issue(60)
        self.clock.advance(59)
        self.assertEqual(
            self.tokens.redeem(tokenId, self.proof(secret), self.instance),
            self.owner,
        )

    def test_unknown(self) -> None:
        """
        A token this instance did not issue (or issued before it restarted)
        is refused, whatever the proof.
        """
        secret = os.urandom(SECRET_BYTES)
        self.assertRefused(tokenIdOf(secret), self.proof(secret), "issued no such")
        restarted = JoinTokens(self.service, self.clock.seconds)
        tokenId, secret, _ = self.issue()
        self.assertRaises(
            JoinRefused, restarted.redeem, tokenId, self.proof(secret), self.instance
        )

    def test_wrongProof(self) -> None:
        """
        A wrong proof is refused; fewer than L{MAX_WRONG_PROOFS} of them
        leave the token usable.
        """
        tokenId, secret, _ = self.issue()
        for _ in range(MAX_WRONG_PROOFS - 1):
            self.assertRefused(tokenId, os.urandom(32), "proof is wrong")
        self.assertEqual(
            self.tokens.redeem(tokenId, self.proof(secret), self.instance),
            self.owner,
        )

    def test_burntAfterWrongProofs(self) -> None:
        """
        After L{MAX_WRONG_PROOFS} wrong proofs the token is burnt: even the
        right proof is then refused.
        """
        tokenId, secret, _ = self.issue()
        for _ in range(MAX_WRONG_PROOFS):
            self.assertRefused(tokenId, b"\x00" * 32, "proof is wrong")
        self.assertRaises(
            JoinRefused,
            self.tokens.redeem,
            tokenId,
            self.proof(secret),
            self.instance,
        )

    def test_proofForAnotherInstance(self) -> None:
        """
        A proof made for another instance's key (a proof seen on one
        connection, replayed on another) is refused.
        """
        tokenId, secret, _ = self.issue()
        replayed = self.proof(secret, "SHA256:someone-else")
        self.assertRefused(tokenId, replayed, "proof is wrong")

    def test_proofForAnotherService(self) -> None:
        """
        A proof made for another service key (the secret shown to an
        impostor) is refused.
        """
        tokenId, secret, _ = self.issue()
        token = JoinToken(ENDPOINT, self.service, secret, 0)
        self.assertRefused(
            tokenId, token.proof("SHA256:impostor", self.instance), "proof is wrong"
        )

    def test_ttlRange(self) -> None:
        """
        A token lives more than 0 and at most L{MAX_TOKEN_TTL} seconds.
        """
        for ttl in [0.0, -1.0, MAX_TOKEN_TTL + 1, math.inf, math.nan]:
            error = self.assertRaises(JoinError, self.issue, ttl)
            self.assertIn("at most", str(error))
        self.issue(MAX_TOKEN_TTL)

    def test_tooMany(self) -> None:
        """
        At most L{MAX_TOKENS} are kept, used or not; once they are
        forgotten, more can be issued.
        """
        first = [self.issue(60) for _ in range(MAX_TOKENS)]
        tokenId, secret, _ = first[0]
        self.tokens.redeem(tokenId, self.proof(secret), self.instance)
        error = self.assertRaises(JoinError, self.issue)
        self.assertIn("outstanding", str(error))
        self.clock.advance(60 + _REMEMBER + 1)
        self.issue()

    def test_lapsedForgotten(self) -> None:
        """
        A lapsed token is remembered (and refused as expired) for
        L{_REMEMBER} seconds, then forgotten.
        """
        tokenId, secret, expires = self.issue(60)
        self.clock.advance(expires - NOW + _REMEMBER - 1)
        self.assertRefused(tokenId, self.proof(secret), "expired")
        self.clock.advance(2)
        self.assertRefused(tokenId, self.proof(secret), "issued no such")

    def test_usedForgotten(self) -> None:
        tokenId, secret, expires = self.issue(60)
        self.tokens.redeem(tokenId, self.proof(secret), self.instance)
        self.clock.advance(expires - NOW + _REMEMBER + 1)
        self.assertRefused(tokenId, self.proof(secret), "issued no such")


# Key requests


class KeyRequestsTests(SynchronousTestCase):
    """
    L{KeyRequests}: routers' waiting requests for the service's key.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.bus = ControlBus()
        self.messages: list[ControlMessage] = []
        self.bus.watch(self.messages.append)
        self.events = observe(self)
        self.owner = makeIdentity("acme", "alice")
        self.daemon = makeIdentity("acme", "ledger")
        self.router = peerOf(makeIdentity("acme", "router"))
        self.requests = KeyRequests(SERVICE, self.bus, self.clock, ttl=3600)

    def kinds(self) -> list[str]:
        return [m.kind for m in self.messages]

    def decision(
        self,
        state: str = "release",
        subject: PeerIdentity | None = None,
        at: float | None = None,
        reason: str = "the new router",
    ) -> SignedDecision:
        return sign(
            self.owner,
            self.daemon,
            subject or self.router,
            state,
            self.clock.seconds() if at is None else at,
            reason,
        )

    def assertNotReleased(self, waiting: Deferred[str]) -> None:
        """
        C{waiting} (a waiter that was withdrawn) did not get the key: it
        waits still, or failed with L{KeyRequestRefused}.
        """
        results: list[object] = []
        waiting.addBoth(results.append)
        for result in results:
            self.assertIsInstance(result, Failure)
            assert isinstance(result, Failure)
            self.assertIsInstance(result.value, KeyRequestRefused)

    def test_addAnnounces(self) -> None:
        """
        A new request is announced to the owners as C{key_requested}, with
        its id, the router's key and where it came from, and logged.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        self.assertEqual(
            (request.fingerprint, request.instance, request.source),
            (self.router.fingerprint, "edge-1", "10.0.0.5:5000"),
        )
        self.assertEqual((request.firstSeen, request.expires), (NOW, NOW + 3600))
        [message] = self.messages
        self.assertEqual(
            (
                message.kind,
                message.service,
                message.fingerprint,
                message.org,
                message.peerService,
                message.requestId,
                message.source,
            ),
            (
                "key_requested",
                SERVICE,
                self.router.fingerprint,
                "acme",
                "router",
                request.requestId,
                "10.0.0.5:5000",
            ),
        )
        self.assertIn("edge-1", message.reason)
        [event] = eventsNamed(self.events, "dwtrust.key_request.received")
        self.assertEqual(event["request_id"], request.requestId)
        self.assertEqual(list(self.requests), [request])

    def test_dedupe(self) -> None:
        """
        A key has one request: asking again gives the same one, announced
        once.
        """
        first = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        again = self.requests.add(self.router, "10.0.0.6:6000", "edge-2")
        self.assertIs(again, first)
        self.assertEqual(self.kinds(), ["key_requested"])
        self.assertEqual(list(self.requests), [first])

    def test_capTotal(self) -> None:
        """
        Beyond C{maxPending} waiting requests, more are refused and logged,
        and not announced.
        """
        requests = KeyRequests(SERVICE, self.bus, self.clock, maxPending=2)
        requests.add(peerOf(makeIdentity("acme", "r1")), "10.0.0.1:1", "a")
        requests.add(peerOf(makeIdentity("acme", "r2")), "10.0.0.2:1", "b")
        third = peerOf(makeIdentity("acme", "r3"))
        error = self.assertRaises(
            KeyRequestRefused, requests.add, third, "10.0.0.3:1", "c"
        )
        self.assertIn("2 key requests are pending already", str(error))
        [event] = eventsNamed(self.events, "dwtrust.key_request.refused")
        self.assertEqual(
            (event["fingerprint"], event["source"]), (third.fingerprint, "10.0.0.3:1")
        )
        self.assertEqual(len(list(requests)), 2)
        self.assertEqual(self.kinds(), ["key_requested", "key_requested"])

    def test_capPerSource(self) -> None:
        """
        Beyond C{maxPendingPerSource} requests from one address prefix
        (whatever the address in it and the port), more from it are refused;
        other prefixes may still ask.
        """
        requests = KeyRequests(SERVICE, self.bus, self.clock, maxPendingPerSource=1)
        requests.add(peerOf(makeIdentity("acme", "r1")), "10.0.0.1:1000", "a")
        second = peerOf(makeIdentity("acme", "r2"))
        error = self.assertRaises(
            KeyRequestRefused, requests.add, second, "10.0.0.1:2000", "b"
        )
        self.assertIn("10.0.0.0/24 already has 1 pending key requests", str(error))
        [event] = eventsNamed(self.events, "dwtrust.key_request.refused")
        self.assertEqual(event["fingerprint"], second.fingerprint)
        self.assertRaises(KeyRequestRefused, requests.add, second, "10.0.0.9:1", "b")
        requests.add(second, "10.0.1.2:2000", "b")
        self.assertEqual(len(list(requests)), 2)

    def test_release(self) -> None:
        """
        An owner's C{release} fires the waiting router with the signer's
        fingerprint, ends the request (and its timer) and is announced.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        waiting = self.requests.wait(request)
        self.assertNoResult(waiting)
        self.assertIs(self.requests.decide(self.decision()), request)
        self.assertEqual(self.successResultOf(waiting), self.owner.fingerprint)
        self.assertEqual(list(self.requests), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        released = self.messages[-1]
        self.assertEqual(
            (released.kind, released.state, released.decidedBy, released.reason),
            ("key_released", "release", self.owner.fingerprint, "the new router"),
        )
        [event] = eventsNamed(self.events, "dwtrust.key_request.released")
        self.assertEqual(event["signer"], self.owner.fingerprint)

    def test_withhold(self) -> None:
        """
        An owner's C{withhold} fails the waiting router with
        L{KeyRequestRefused}, giving the owner's reason.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        waiting = self.requests.wait(request)
        self.requests.decide(self.decision("withhold", reason="not that box"))
        error = self.failureResultOf(waiting, KeyRequestRefused).value
        self.assertIn("not that box", str(error))
        self.assertEqual(list(self.requests), [])
        self.assertEqual(self.kinds()[-1], "key_withheld")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitAfterEnded(self) -> None:
        """
        Waiting on a request that ended unanswered (it lapsed, or was
        withdrawn) fails at once.
        """
        lapsed = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        self.clock.advance(3600)
        self.failureResultOf(self.requests.wait(lapsed), KeyRequestRefused)
        withdrawn = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        self.requests.withdraw(withdrawn)
        self.failureResultOf(self.requests.wait(withdrawn), KeyRequestRefused)

    def test_staleDecision(self) -> None:
        """
        A decision signed more than L{RELEASE_SKEW} seconds before the
        request was made is refused, and the request waits on.
        """
        self.clock.advance(1000)
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        waiting = self.requests.wait(request)
        stale = self.decision(at=request.firstSeen - RELEASE_SKEW - 1)
        error = self.assertRaises(KeyRequestRefused, self.requests.decide, stale)
        self.assertIn("before this key request", str(error))
        self.assertNoResult(waiting)
        self.assertEqual(list(self.requests), [request])
        self.assertEqual(self.kinds(), ["key_requested"])
        skewed = self.decision(at=request.firstSeen - RELEASE_SKEW + 1)
        self.requests.decide(skewed)
        self.assertEqual(self.successResultOf(waiting), self.owner.fingerprint)

    def test_lapse(self) -> None:
        """
        A request nobody answers within its time lapses: the router is
        failed, the owners are told (C{key_request_expired}), it is logged.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        waiting = self.requests.wait(request)
        self.clock.advance(3599)
        self.assertNoResult(waiting)
        self.clock.advance(1)
        error = self.failureResultOf(waiting, KeyRequestRefused).value
        self.assertIn("lapsed", str(error))
        self.assertEqual(list(self.requests), [])
        self.assertEqual(self.kinds(), ["key_requested", "key_request_expired"])
        [event] = eventsNamed(self.events, "dwtrust.key_request.expired")
        self.assertEqual(event["request_id"], request.requestId)
        self.assertRaises(KeyRequestRefused, self.requests.decide, self.decision())

    def test_withdraw(self) -> None:
        """
        A request whose router went away, with nobody else waiting on it,
        is dropped and announced as withdrawn; a later release finds
        nothing to release.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        self.requests.withdraw(request)
        self.assertEqual(list(self.requests), [])
        self.assertEqual(self.kinds(), ["key_requested", "key_request_withdrawn"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        [event] = eventsNamed(self.events, "dwtrust.key_request.withdrawn")
        self.assertEqual(event["request_id"], request.requestId)
        self.assertRaises(KeyRequestRefused, self.requests.decide, self.decision())

    def test_withdrawKeepsOtherWaiters(self) -> None:
        """
        A request another connection still waits on is not withdrawn.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        other = self.requests.wait(request)
        self.requests.withdraw(request)
        self.assertEqual(list(self.requests), [request])
        self.requests.decide(self.decision())
        self.assertEqual(self.successResultOf(other), self.owner.fingerprint)

    def test_withdrawOwnWaiter(self) -> None:
        """
        What the router that went away waited on does not count as another
        waiter: the request is withdrawn, and a later release finds nothing.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        own = self.requests.wait(request)
        self.requests.withdraw(request, own)
        self.assertEqual(list(self.requests), [])
        self.assertEqual(self.kinds(), ["key_requested", "key_request_withdrawn"])
        self.assertRaises(KeyRequestRefused, self.requests.decide, self.decision())
        self.assertNotReleased(own)

    def test_withdrawOwnWaiterKeepsOthers(self) -> None:
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        own = self.requests.wait(request)
        other = self.requests.wait(request)
        self.requests.withdraw(request, own)
        self.assertEqual(list(self.requests), [request])
        self.requests.decide(self.decision())
        self.assertEqual(self.successResultOf(other), self.owner.fingerprint)
        self.assertNotReleased(own)

    def test_withdrawEnded(self) -> None:
        """
        Withdrawing a request that was already answered changes nothing.
        """
        request = self.requests.add(self.router, "10.0.0.5:5000", "edge-1")
        self.requests.decide(self.decision())
        before = self.kinds()
        self.requests.withdraw(request)
        self.assertEqual(self.kinds(), before)

    def test_decideUnknown(self) -> None:
        """
        A decision about a key that has no waiting request is refused.
        """
        error = self.assertRaises(
            KeyRequestRefused, self.requests.decide, self.decision()
        )
        self.assertIn(self.router.fingerprint, str(error))
        self.assertEqual(self.messages, [])


# The control channel, in memory


class ClientFactory(Factory):
    """
    Builds L{ControlProtocol}s, and keeps them.
    """

    def __init__(self) -> None:
        self.protocols: list[ControlProtocol] = []

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        protocol = ControlProtocol()
        self.protocols.append(protocol)
        return protocol


class ChannelTestCase(SynchronousTestCase):
    """
    The service C{acme/ledger} serving its control channel with
    L{ControlPolicy} and provisioning: C{acme/alice} is a registered owner
    (in the store), C{acme/bob} an owner given outside the store, and
    C{join/newbox} and C{acme/router} are keys that are no owners'.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.events = observe(self)
        self.daemon = makeIdentity("acme", "ledger")
        self.owner = makeIdentity("acme", "alice")
        self.bob = makeIdentity("acme", "bob")
        self.newcomer = makeIdentity("join", "newbox")
        self.router = makeIdentity("acme", "router")
        self.store = MemoryTrustStore(now=self.clock.seconds)
        self.registration = registerOwner(self.daemon, peerOf(self.owner), NOW)
        self.successResultOf(
            self.store.addOwner(self.owner.fingerprint, self.registration.encode())
        )
        self.bus = ControlBus()
        self.messages: list[ControlMessage] = []
        self.bus.watch(self.messages.append)
        self.owners = Signers([self.owner.publicKey])
        self.provisioning = Provisioning(
            self.daemon,
            self.store,
            self.bus,
            self.clock,
            owners=[peerOf(self.bob)],
            now=self.clock.seconds,
        )
        self.server = Authenticator(self.daemon, ControlPolicy(), None, self.clock)
        self.factory = controlFactory(
            decisionsFor(self.daemon, self.store, self.owners, self.bus, self.clock),
            self.bus,
            self.provisioning,
            clock=self.clock,
        )
        self.pumps: list[IOPump] = []

    def connect(self, identity: Identity) -> ControlProtocol:
        """
        Connect C{identity} to the control channel, in memory, over real TLS
        and the real handshake.
        """
        client = Authenticator(
            identity, None, PinningPolicy(MemoryTrustStore()), self.clock
        )
        clientFactory = ClientFactory()
        _, _, pump = connectInMemory(
            self.server, self.factory, client, clientFactory, self.clock
        )
        self.pumps.append(pump)
        [protocol] = clientFactory.protocols
        self.assertIsNone(protocol.lostReason)
        return protocol

    def flush(self) -> None:
        flushAll(*self.pumps)

    def call(
        self, protocol: amp.AMP, command: type[amp.Command], **arguments: Any
    ) -> Deferred[dict[str, Any]]:
        """
        Call C{command}, listening at once for its answer, and run the
        connections until they are quiet.
        """

        async def calling() -> dict[str, Any]:
            answer: dict[str, Any] = await protocol.callRemote(command, **arguments)
            return answer

        result = Deferred.fromCoroutine(calling())
        self.flush()
        return result

    def answer(
        self, protocol: amp.AMP, command: type[amp.Command], **arguments: Any
    ) -> dict[str, Any]:
        return self.successResultOf(self.call(protocol, command, **arguments))

    def refusal(
        self,
        error: type[Exception],
        protocol: amp.AMP,
        command: type[amp.Command],
        **arguments: Any,
    ) -> Exception:
        value = self.failureResultOf(
            self.call(protocol, command, **arguments), error
        ).value
        assert isinstance(value, Exception)
        return value

    def pending(self, owner: ControlProtocol) -> list[dict[str, Any]]:
        answer = self.answer(owner, ListPending)
        entries: list[dict[str, Any]] = json.loads(answer["page"])["entries"]
        return entries

    def issue(self, owner: ControlProtocol, ttl: float = 600.0) -> JoinToken:
        answer = self.answer(owner, IssueJoinToken, ttl=ttl)
        return JoinToken(
            ENDPOINT, self.daemon.fingerprint, answer["secret"], answer["expires"]
        )

    def join(
        self, protocol: ControlProtocol, token: JoinToken, identity: Identity
    ) -> Deferred[dict[str, Any]]:
        return self.call(
            protocol,
            Join,
            tokenId=token.tokenId,
            proof=token.proof(self.daemon.fingerprint, identity.fingerprint),
            instance="newbox",
        )

    def release(
        self, owner: ControlProtocol, state: str = "release", reason: str = "ok"
    ) -> Deferred[dict[str, Any]]:
        decision = sign(
            self.owner,
            self.daemon,
            peerOf(self.router),
            state,
            self.clock.seconds(),
            reason,
        )
        return self.call(owner, Decide, decision=decision.encode())

    def assertKit(self, kit: dict[str, Any]) -> None:
        """
        C{kit} is the service's identity, with its owners' registrations
        (the store's, and those made for the owners given outside it).
        """
        self.assertEqual((kit["org"], kit["service"]), ("acme", "ledger"))
        key = serialization.load_ssh_private_key(kit["privateKey"], None)
        received = Identity.fromPrivateKey(kit["org"], kit["service"], key)  # type: ignore[arg-type]
        self.assertEqual(received.fingerprint, self.daemon.fingerprint)
        registered = {
            SignedDecision.decode(r).fingerprint: SignedDecision.decode(r)
            for r in kit["owners"]
        }
        self.assertEqual(
            set(registered), {self.owner.fingerprint, self.bob.fingerprint}
        )
        itself = Signers([self.daemon.publicKey])
        for registration in registered.values():
            self.assertEqual(registration.state, "owner")
            itself.verify(registration, SERVICE, self.daemon.fingerprint)


class IssueJoinTokenTests(ChannelTestCase):
    """
    C{IssueJoinToken}, and what keys that are no owners' may not do.
    """

    def test_ownerGetsToken(self) -> None:
        """
        An owner gets a fresh token, which the service remembers as issued
        by that owner; the issue is logged without the secret.
        """
        owner = self.connect(self.owner)
        answer = self.answer(owner, IssueJoinToken, ttl=120.0)
        self.assertEqual(answer["tokenId"], tokenIdOf(answer["secret"]))
        self.assertEqual(len(answer["secret"]), SECRET_BYTES)
        self.assertEqual(answer["expires"], int(NOW + 120))
        issuedBy = self.provisioning.tokens.redeem(
            answer["tokenId"],
            JoinToken(ENDPOINT, FINGERPRINT, answer["secret"], 0).proof(
                self.daemon.fingerprint, "SHA256:x"
            ),
            "SHA256:x",
        )
        self.assertEqual(issuedBy, self.owner.fingerprint)
        [event] = eventsNamed(self.events, "dwtrust.join.token_issued")
        self.assertEqual(event["owner"], self.owner.fingerprint)
        self.assertNotIn(answer["secret"].hex(), repr(event))

    def test_ttlOutOfRange(self) -> None:
        owner = self.connect(self.owner)
        error = self.refusal(JoinError, owner, IssueJoinToken, ttl=MAX_TOKEN_TTL * 2)
        self.assertIn("at most", str(error))

    def test_nonOwner(self) -> None:
        """
        A key that is no owner's is let onto the channel, but every owner's
        command answers L{NotAnOwner}, and it is logged; the connection
        stays open.
        """
        stranger = self.connect(self.newcomer)
        decision = sign(
            self.newcomer, self.daemon, peerOf(self.router), "release", NOW, "mine"
        )
        calls: list[tuple[type[amp.Command], dict[str, Any]]] = [
            (ListPending, {}),
            (ListPeers, {}),
            (Decide, {"decision": decision.encode()}),
            (Watch, {}),
            (IssueJoinToken, {"ttl": 60.0}),
        ]
        for command, arguments in calls:
            error = self.refusal(NotAnOwner, stranger, command, **arguments)
            self.assertIn(self.newcomer.fingerprint, str(error))
            self.assertIn("not a registered owner", str(error))
        self.assertEqual(len(eventsNamed(self.events, "dwtrust.control.refused")), 5)
        self.assertIsNone(stranger.lostReason)
        self.assertEqual(len(self.provisioning.tokens._tokens), 0)


class JoinTests(ChannelTestCase):
    """
    C{Join} and C{ServiceRecords}: a new instance redeems a token.
    """

    def setUp(self) -> None:
        super().setUp()
        self.billing = peerOf(makeIdentity("acme", "billing"))
        self.successResultOf(
            recordDecision(
                self.store, self.owner, self.daemon, self.billing, KeyState.approved
            )
        )
        self.ownerClient = self.connect(self.owner)

    def test_join(self) -> None:
        """
        The right proof for a token an owner took gets the service's key
        (which loads with C{cryptography}), its owners, and the count of its
        records; the join is logged with the issuing owner.
        """
        token = self.issue(self.ownerClient)
        newbox = self.connect(self.newcomer)
        kit = self.successResultOf(self.join(newbox, token, self.newcomer))
        self.assertKit(kit)
        self.assertEqual(kit["records"], 1)
        [event] = eventsNamed(self.events, "dwtrust.join.cloned")
        self.assertEqual(
            (event["issued_by"], event["fingerprint"], event["instance"]),
            (self.owner.fingerprint, self.newcomer.fingerprint, "newbox"),
        )

    def test_records(self) -> None:
        """
        After a join, the service's signed decisions follow, page by page.
        """
        token = self.issue(self.ownerClient)
        newbox = self.connect(self.newcomer)
        self.successResultOf(self.join(newbox, token, self.newcomer))
        page = self.answer(newbox, ServiceRecords, offset=0)
        self.assertEqual(page["total"], 1)
        [decision] = [SignedDecision.decode(d) for d in page["decisions"]]
        self.assertEqual(
            (decision.fingerprint, decision.state),
            (self.billing.fingerprint, "approved"),
        )
        self.assertEqual(self.answer(newbox, ServiceRecords, offset=1)["decisions"], [])

    def test_recordsBeforeJoin(self) -> None:
        """
        C{ServiceRecords} before a join (or after a refused one) is refused.
        """
        newbox = self.connect(self.newcomer)
        self.refusal(KeyRequestRefused, newbox, ServiceRecords, offset=0)
        forged = JoinToken(
            ENDPOINT, self.daemon.fingerprint, os.urandom(SECRET_BYTES), 0
        )
        self.failureResultOf(self.join(newbox, forged, self.newcomer), JoinRefused)
        self.refusal(KeyRequestRefused, newbox, ServiceRecords, offset=0)

    def test_collectBeforeRequest(self) -> None:
        newbox = self.connect(self.newcomer)
        error = self.refusal(KeyRequestRefused, newbox, CollectKey)
        self.assertIn("key request first", str(error))

    def test_forged(self) -> None:
        """
        A token the service never issued is refused, and the refusal is
        logged with the caller's key.
        """
        newbox = self.connect(self.newcomer)
        forged = JoinToken(
            ENDPOINT, self.daemon.fingerprint, os.urandom(SECRET_BYTES), 0
        )
        error = self.failureResultOf(
            self.join(newbox, forged, self.newcomer), JoinRefused
        ).value
        self.assertIn("issued no such", str(error))
        [event] = eventsNamed(self.events, "dwtrust.join.refused")
        self.assertEqual(event["fingerprint"], self.newcomer.fingerprint)

    def test_usedTwice(self) -> None:
        """
        A token works once: a second instance with it is refused.
        """
        token = self.issue(self.ownerClient)
        self.successResultOf(
            self.join(self.connect(self.newcomer), token, self.newcomer)
        )
        other = makeIdentity("join", "otherbox")
        error = self.failureResultOf(
            self.join(self.connect(other), token, other), JoinRefused
        ).value
        self.assertIn("already used", str(error))

    def test_proofOfAnotherConnection(self) -> None:
        """
        A proof made for another instance's key (seen elsewhere and replayed)
        does not redeem the token on this connection.
        """
        token = self.issue(self.ownerClient)
        other = makeIdentity("join", "otherbox")
        newbox = self.connect(self.newcomer)
        self.failureResultOf(self.join(newbox, token, other), JoinRefused)

    def test_badInstanceName(self) -> None:
        """
        An instance name that is not a valid name is refused, and the token
        is not spent.
        """
        token = self.issue(self.ownerClient)
        newbox = self.connect(self.newcomer)
        d = self.call(
            newbox,
            Join,
            tokenId=token.tokenId,
            proof=token.proof(self.daemon.fingerprint, self.newcomer.fingerprint),
            instance="../etc",
        )
        self.failureResultOf(d, JoinRefused)
        self.successResultOf(self.join(newbox, token, self.newcomer))

    def test_refusalLogEscaped(self) -> None:
        """
        What a refused newcomer sent is logged escaped: a line break in its
        instance name or token id cannot start a line of its own.
        """
        newbox = self.connect(self.newcomer)
        d = self.call(
            newbox,
            Join,
            tokenId="ab\ncd",
            proof=b"x" * 32,
            instance="x\ndwtrust: forged",
        )
        self.failureResultOf(d, JoinRefused)
        [refused] = eventsNamed(self.events, "dwtrust.join.refused")
        self.assertEqual(refused["instance"], "x\\ndwtrust: forged")
        self.assertEqual(refused["token_id"], "ab\\ncd")


class KeyRequestChannelTests(ChannelTestCase):
    """
    C{RequestKey} and C{CollectKey}: a router asks the owners for the key.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ownerClient = self.connect(self.owner)
        self.routerClient = self.connect(self.router)

    def requestKey(self) -> dict[str, Any]:
        return self.answer(self.routerClient, RequestKey, instance="edge-1")

    def test_releaseDelivers(self) -> None:
        """
        A router's request is announced and listed for the owners (as a
        C{key_request}); once an owner releases it, C{CollectKey} answers
        with the service's key and owners.
        """
        requested = self.requestKey()
        self.assertEqual(requested["expires"], NOW + self.provisioning.keyRequests.ttl)
        [entry] = self.pending(self.ownerClient)
        self.assertEqual(
            (entry["kind"], entry["id"], entry["fingerprint"], entry["instance"]),
            ("key_request", requested["requestId"], self.router.fingerprint, "edge-1"),
        )
        self.assertIn("key_requested", [m.kind for m in self.messages])
        collecting = self.call(self.routerClient, CollectKey)
        self.assertNoResult(collecting)
        answer = self.successResultOf(self.release(self.ownerClient))
        entry = json.loads(answer["peer"])
        self.assertEqual(
            (entry["state"], entry["decidedBy"]), ("release", self.owner.fingerprint)
        )
        self.flush()
        self.assertKit(self.successResultOf(collecting))
        self.assertEqual(self.pending(self.ownerClient), [])
        [event] = eventsNamed(self.events, "dwtrust.key_request.delivered")
        self.assertEqual(event["signer"], self.owner.fingerprint)
        self.assertEqual(
            self.answer(self.routerClient, ServiceRecords, offset=0)["total"], 0
        )

    def test_pendingListsBoth(self) -> None:
        """
        C{ListPending} lists the stored approval requests and the waiting
        key requests together.
        """
        billing = peerOf(makeIdentity("acme", "billing"))
        self.successResultOf(
            self.store.addPending(billing, "10.1.1.1:1", "0123456789", NOW + 60, 9, 9)
        )
        self.requestKey()
        entries = self.pending(self.ownerClient)
        self.assertEqual(
            [(e.get("kind"), e["fingerprint"]) for e in entries],
            [(None, billing.fingerprint), ("key_request", self.router.fingerprint)],
        )

    def test_withhold(self) -> None:
        """
        An owner's C{withhold} fails the router's C{CollectKey} with
        L{KeyRequestRefused}, giving the reason; nothing is delivered.
        """
        self.requestKey()
        collecting = self.call(self.routerClient, CollectKey)
        self.successResultOf(self.release(self.ownerClient, "withhold", "no thanks"))
        self.flush()
        error = self.failureResultOf(collecting, KeyRequestRefused).value
        self.assertIn("no thanks", str(error))
        self.refusal(KeyRequestRefused, self.routerClient, ServiceRecords, offset=0)
        self.assertEqual(eventsNamed(self.events, "dwtrust.key_request.delivered"), [])

    def test_releaseByNonOwnerRefused(self) -> None:
        """
        A release signed by a key that is no owner's, sent by an owner, is
        refused; the request waits on.
        """
        self.requestKey()
        collecting = self.call(self.routerClient, CollectKey)
        forged = sign(
            self.router, self.daemon, peerOf(self.router), "release", NOW, "me"
        )
        self.refusal(
            DecisionRefused, self.ownerClient, Decide, decision=forged.encode()
        )
        self.assertNoResult(collecting)
        self.assertEqual(len(self.pending(self.ownerClient)), 1)

    def test_releaseWithoutRequest(self) -> None:
        error = self.failureResultOf(self.release(self.ownerClient), DecisionRefused)
        self.assertIn("no key request", str(error.value))

    def test_oneRequestPerConnection(self) -> None:
        self.requestKey()
        error = self.refusal(
            KeyRequestRefused, self.routerClient, RequestKey, instance="edge-1"
        )
        self.assertIn("already made", str(error))

    def test_lapse(self) -> None:
        """
        A request no owner answers lapses: C{CollectKey} fails.
        """
        self.requestKey()
        collecting = self.call(self.routerClient, CollectKey)
        self.clock.advance(self.provisioning.keyRequests.ttl)
        self.flush()
        self.failureResultOf(collecting, KeyRequestRefused)
        self.assertEqual(self.pending(self.ownerClient), [])

    def test_disconnectBeforeCollect(self) -> None:
        """
        A router that goes away before it collects withdraws its request.
        """
        self.requestKey()
        self.routerClient.transport.loseConnection()  # type: ignore[union-attr]
        self.flush()
        self.assertEqual(self.pending(self.ownerClient), [])
        self.assertIn("key_request_withdrawn", [m.kind for m in self.messages])

    def test_disconnectWhileCollecting(self) -> None:
        """
        A router that goes away while it waits in C{CollectKey} withdraws
        its request: the owners no longer see it, a later release finds
        nothing, and nothing is delivered.
        """
        self.requestKey()
        collecting = self.call(self.routerClient, CollectKey)
        self.assertNoResult(collecting)
        self.routerClient.transport.loseConnection()  # type: ignore[union-attr]
        self.flush()
        self.failureResultOf(collecting)
        self.assertEqual(self.pending(self.ownerClient), [])
        self.assertIn("key_request_withdrawn", [m.kind for m in self.messages])
        self.failureResultOf(self.release(self.ownerClient), DecisionRefused)
        self.assertEqual(eventsNamed(self.events, "dwtrust.key_request.delivered"), [])

    def test_releaseBeforeCollect(self) -> None:
        """
        An owner may answer as soon as the request is announced, before the
        router's C{CollectKey} arrives: the release still reaches it.
        """
        self.requestKey()
        self.successResultOf(self.release(self.ownerClient))
        collecting = self.call(self.routerClient, CollectKey)
        self.assertKit(self.successResultOf(collecting))


# clone() and requestKey() over real loopback TCP


class _Tracked(ProtocolWrapper):
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        ProtocolWrapper.connectionLost(self, reason)
        closed: Deferred[None] = self.factory.closed.pop(self)
        closed.callback(None)


class _Tracking(WrappingFactory):
    """
    Wraps the listening factory, to wait for each TCP connection to close.
    """

    protocol = _Tracked

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.closed: dict[ProtocolWrapper, Deferred[None]] = {}

    def buildProtocol(self, addr: IAddress) -> ProtocolWrapper:  # type: ignore[override]
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        self.closed[protocol] = Deferred()
        return protocol


class _DecideOnWait(KeyRequests):
    """
    L{KeyRequests} that calls C{onWait} once a router waits on a request:
    where a test plays the owner.
    """

    onWait: Callable[[KeyRequest], object] = staticmethod(lambda request: None)

    def wait(self, request: KeyRequest) -> Deferred[str]:
        waiting = super().wait(request)
        self.onWait(request)
        return waiting


class LoopbackTests(TestCase):
    """
    L{clone} and L{requestKey} against a control endpoint served by this
    process on TCP loopback, with dwtrust and L{ControlPolicy}.
    """

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.parent = temporaryDirectory(self)
        self.daemon = makeIdentity("acme", "ledger")
        self.owner = makeIdentity("acme", "alice")
        self.stranger = makeIdentity("acme", "mallory")
        self.store = MemoryTrustStore()
        registration = registerOwner(self.daemon, peerOf(self.owner), 1e9)
        await self.store.addOwner(self.owner.fingerprint, registration.encode())
        self.billing = peerOf(makeIdentity("acme", "billing"))
        self.payroll = peerOf(makeIdentity("acme", "payroll"))
        await recordDecision(
            self.store, self.owner, self.daemon, self.billing, KeyState.approved
        )
        # A record the store holds, signed by a key that is no owner's, and
        # that key's own "registration", not signed by the service: a clone
        # must take neither.
        forgedOwner = sign(
            self.stranger, self.daemon, peerOf(self.stranger), "owner", 1e9, "me too"
        )
        await self.store.addOwner(self.stranger.fingerprint, forgedOwner.encode())
        await recordDecision(
            self.store, self.stranger, self.daemon, self.payroll, KeyState.approved
        )
        self.bus = ControlBus()
        self.provisioning = Provisioning(self.daemon, self.store, self.bus, reactor)
        self.keyRequests = _DecideOnWait(SERVICE, self.bus, reactor)
        self.provisioning.keyRequests = self.keyRequests
        owners = Signers([self.owner.publicKey])
        self.tracking = _Tracking(
            Authenticator(
                self.daemon, ControlPolicy(), None, reactor
            ).wrapServerFactory(
                controlFactory(
                    decisionsFor(self.daemon, self.store, owners, self.bus),
                    self.bus,
                    self.provisioning,
                )
            )
        )
        port: IListeningPort = await TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(self.tracking)
        self.addCleanup(self.closed)
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.port = address.port
        self.endpoint = f"tcp:host=127.0.0.1:port={self.port}"
        self.target = FilePath(self.parent.path).child("ledger2")

    def closed(self) -> Deferred[Any]:
        """
        Fires once every connection the service accepted has closed.
        """
        return DeferredList(list(self.tracking.closed.values()))

    def token(self, fingerprint: str | None = None) -> JoinToken:
        _, secret, expires = self.provisioning.tokens.issue(60, self.owner.fingerprint)
        return JoinToken(
            self.endpoint, fingerprint or self.daemon.fingerprint, secret, expires
        )

    def assertNothingWritten(self) -> None:
        self.assertFalse(self.target.exists())
        self.assertEqual(
            [n for n in self.parent.listdir() if n.startswith(".ledger2.")], []
        )

    async def storeOf(self, directory: FilePath[str]) -> tuple[list[Any], list[bytes]]:
        records = await SQLiteStore.open(directory.child(STORE_FILE))
        try:
            return await records.decided(), await records.owners()
        finally:
            await records.close()

    async def test_clone(self) -> None:
        """
        A new instance with a token gets the service's identity (its private
        key 0600), and a store with the owners and the decisions the owners
        signed; the staging directory is gone.
        """
        identity = await clone(reactor, self.token(), self.target, instance="box2")
        self.assertEqual(identity.fingerprint, self.daemon.fingerprint)
        loaded = Identity.load(self.target)
        self.assertEqual(
            (loaded.name, loaded.fingerprint), (SERVICE, self.daemon.fingerprint)
        )
        mode = stat.S_IMODE(os.stat(self.target.child(PRIVATE_KEY_FILE).path).st_mode)
        self.assertEqual(mode, 0o600)
        decided, owners = await self.storeOf(self.target)
        self.assertEqual(
            [(r.fingerprint, r.state) for r in decided],
            [(self.billing.fingerprint, KeyState.approved)],
        )
        self.assertEqual(
            [SignedDecision.decode(o).fingerprint for o in owners],
            [self.owner.fingerprint],
        )
        Signers([self.owner.publicKey]).verify(
            SignedDecision.decode(decided[0].decision), SERVICE, self.daemon.fingerprint
        )
        self.assertEqual(
            sorted(n for n in self.parent.listdir() if n.startswith(".")), []
        )

    async def test_cloneIntoEmptyDirectory(self) -> None:
        self.target.makedirs()
        await clone(reactor, self.token(), self.target, instance="box2")
        self.assertTrue(self.target.child(PRIVATE_KEY_FILE).exists())

    async def test_tokenUsedTwice(self) -> None:
        token = self.token()
        await clone(reactor, token, self.target, instance="box2")
        again = FilePath(self.parent.path).child("ledger3")
        with self.assertRaises(JoinRefused) as caught:
            await clone(reactor, token, again, instance="box3")
        self.assertIn("already used", str(caught.exception))
        self.assertFalse(again.exists())

    async def test_forgedToken(self) -> None:
        """
        A token with a random secret is refused by the service, and nothing
        is written: no target directory, no staging directory.
        """
        forged = JoinToken(
            self.endpoint, self.daemon.fingerprint, os.urandom(SECRET_BYTES), 2**40
        )
        with self.assertRaises(JoinRefused):
            await clone(reactor, forged, self.target, instance="box2")
        self.assertNothingWritten()

    async def test_anotherServiceKey(self) -> None:
        """
        A token naming another key than the one the service proves is
        refused at the handshake, as C{identity_changed}: the secret never
        reaches that service, and nothing is written.
        """
        other = makeIdentity("acme", "ledger", slot="other")
        token = self.token(other.fingerprint)
        with self.assertRaises(HandshakeFailed) as caught:
            await clone(reactor, token, self.target, instance="box2")
        self.assertEqual(caught.exception.code, ErrorCode.identity_changed)
        self.assertFalse(caught.exception.byPeer)
        self.assertNothingWritten()
        self.assertEqual(
            [i.usedBy for i in self.provisioning.tokens._tokens.values()], [""]
        )

    async def test_requestKeyReleased(self) -> None:
        """
        A router's request, released by an owner while it waits, gets the
        service's identity written into the directory it names.
        """
        router = makeIdentity("acme", "router")
        told: list[tuple[PeerIdentity, str, float]] = []

        def release(request: KeyRequest) -> None:
            self.keyRequests.decide(
                sign(self.owner, self.daemon, request.peer, "release", 2e9, "go")
            )

        self.keyRequests.onWait = release
        pins = MemoryTrustStore()
        identity = await requestKey(
            reactor,
            router,
            pins,
            self.endpoint,
            f"127.0.0.1:{self.port}",
            lambda peer: self.target,
            instance="edge-1",
            waiting=lambda *args: told.append(args),
        )
        self.assertEqual(identity.fingerprint, self.daemon.fingerprint)
        self.assertEqual(Identity.load(self.target).fingerprint, identity.fingerprint)
        [(service, requestId, _)] = told
        self.assertEqual(service.fingerprint, self.daemon.fingerprint)
        self.assertEqual(len(requestId), 10)
        self.assertEqual(list(pins.pins), [f"127.0.0.1:{self.port}"])
        decided, _ = await self.storeOf(self.target)
        self.assertEqual([r.fingerprint for r in decided], [self.billing.fingerprint])

    async def test_requestKeyWithheld(self) -> None:
        router = makeIdentity("acme", "router")

        def withhold(request: KeyRequest) -> None:
            self.keyRequests.decide(
                sign(self.owner, self.daemon, request.peer, "withhold", 2e9, "nope")
            )

        self.keyRequests.onWait = withhold
        with self.assertRaises(KeyRequestRefused) as caught:
            await requestKey(
                reactor,
                router,
                MemoryTrustStore(),
                self.endpoint,
                f"127.0.0.1:{self.port}",
                lambda peer: self.target,
                instance="edge-1",
            )
        self.assertIn("nope", str(caught.exception))
        self.assertNothingWritten()


class CloneRefusesTests(SynchronousTestCase):
    """
    L{clone} refuses a target that is not new or empty, before it dials.
    """

    def setUp(self) -> None:
        self.parent = temporaryDirectory(self)
        self.reactor = MemoryReactorClock()
        self.token = JoinToken(
            "tcp:host=127.0.0.1:port=1", FINGERPRINT, b"s" * SECRET_BYTES, 2**40
        )

    def assertRefused(self, target: FilePath[str], word: str) -> None:
        before = sorted(p.path for p in target.walk())
        failed = clone(self.reactor, self.token, target, instance="box2")
        error = self.failureResultOf(failed, IdentityError).value
        self.assertIn(word, str(error))
        self.assertEqual(sorted(p.path for p in target.walk()), before)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_holdsIdentity(self) -> None:
        target = self.parent.child("ledger")
        makeIdentity("acme", "other").save(target)
        self.assertRefused(target, "already holds an identity")

    def test_notEmpty(self) -> None:
        target = self.parent.child("ledger")
        target.makedirs()
        target.child("notes.txt").setContent(b"mine")
        self.assertRefused(target, "new or empty directory")

    def test_aFile(self) -> None:
        target = self.parent.child("ledger")
        target.setContent(b"a file")
        self.assertRefused(target, "new or empty directory")


class RecordsPageTests(SynchronousTestCase):
    """
    L{recordsPage} cuts the decisions a connection is entitled to into pages
    that each fit in one AMP value.
    """

    def test_pagesCoverAllInOrder(self) -> None:
        """
        Paging from offset 0 by the sizes received gives every decision once,
        in order, and no page exceeds L{PAGE_BYTES}; a decision larger than
        a page still gets a page of its own.
        """
        decisions = [bytes([n % 256]) * (50 + 97 * n) for n in range(400)]
        decisions.append(b"x" * (PAGE_BYTES + 10))
        received: list[bytes] = []
        while True:
            page = recordsPage(decisions, len(received))
            self.assertEqual(page["total"], len(decisions))
            if not page["decisions"]:
                break
            if len(page["decisions"]) > 1:
                self.assertLessEqual(
                    sum(len(d) + 2 for d in page["decisions"]), PAGE_BYTES
                )
            received.extend(page["decisions"])
        self.assertEqual(received, decisions)

    def test_pastTheEnd(self) -> None:
        """
        An offset past the end (or below zero, taken as zero) answers sensibly.
        """
        self.assertEqual(recordsPage([b"a"], 5), {"decisions": [], "total": 1})
        self.assertEqual(recordsPage([b"a"], -3), {"decisions": [b"a"], "total": 1})
