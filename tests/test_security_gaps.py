"""
Rows of the attack table in C{docs/security.rst} that C{tests/test_attacks.py}
does not show in full: that each refusal is logged, as a structured event
with its code, and stores nothing; a pending flood against a real owners'
approver, in memory and over the SQLite store; re-entry of a revoked key;
and a key change.
"""

from __future__ import annotations

import gc

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import ApprovalPolicy, ErrorCode, Identity, PeerIdentity
from dwtrust._machine import Refusal
from dwtrust._proof import makeProof
from dwtrust._wire import (
    MAX_BODY,
    VERSION,
    Challenge,
    Frame,
    FrameType,
    Hello,
    Proof,
    Role,
    encodeFrame,
)
from dwtrust._wrap import DEFAULT_TIMEOUT
from dwtrust.approval import ApprovalRequest, OwnersApprover
from dwtrust.control import ControlBus
from dwtrust.store import KeyState, SQLiteStore
from dwtrust.testing import FakeApprover, MemoryTrustStore, recordDecision

from .helpers import (
    ScriptedClientConnection,
    ScriptedPeer,
    answerChallenge,
    connectScriptedClient,
    makeIdentity,
    makeService,
    sendHello,
    snapshot,
    temporaryDirectory,
)
from .test_attacks import HEADER, AttackCase, signedBy

#: Where the scripted clients connect from, as the server names it.
SOURCE = "127.0.0.1:40000"


class LoggedRefusalTests(AttackCase):
    """
    Each attack is refused with its code, logged as one C{dwtrust.refused}
    event naming the code and the source, and stores nothing.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def refusals(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("event") == "dwtrust.refused"]

    def assertLogged(
        self, connection: ScriptedClientConnection, code: ErrorCode
    ) -> LogEvent:
        self.assertRefused(connection, code)
        [event] = self.refusals()
        self.assertEqual(event["code"], code.value)
        self.assertEqual(event["source"], SOURCE)
        self.assertFalse(event["byPeer"])
        self.assertTrue(event["reason"])
        return event

    def test_replay(self) -> None:
        honest = self.attack(self.legitimate, onFrame=answerChallenge())
        recorded = honest.attacker.sent[-1]
        honest.serverTLS.loseConnection()
        honest.pump.flush()
        seen = len(self.refusals())

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                peer.sendRaw(recorded)

        # On a connection whose certificate has the proof's own key, so that
        # only the challenge and exporter it signs can refuse it.
        connection = self.attack(self.legitimate, onFrame=onFrame)
        self.assertRefused(connection, ErrorCode.bad_signature)
        [event] = self.refusals()[seen:]
        self.assertEqual(event["code"], ErrorCode.bad_signature.value)
        self.assertEqual(event["source"], SOURCE)
        # The proof did not verify: no one is named as the peer.
        self.assertIsNone(event["fingerprint"])

    def test_keySubstitution(self) -> None:
        other = makeIdentity("evil", "mallory", slot="other")

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(other, peer, frame)

        self.assertLogged(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_algorithmConfusion(self) -> None:
        identity = makeIdentity("evil", "mallory", "ecdsa-p256")

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(identity, peer, frame, algorithm="ecdsa-sha2-nistp384")

        self.assertLogged(
            self.attack(identity, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )

    def test_spoofedName(self) -> None:
        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            identity = self.attackerIdentity
            return signedBy(
                identity,
                peer,
                frame,
                org="acme",
                service="billing",
                claim=(
                    identity.org,
                    identity.service,
                    identity.algorithm.name,
                    identity.publicKey.blob,
                ),
            )

        self.assertLogged(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_oversizedFrame(self) -> None:
        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(HEADER.pack(VERSION, FrameType.HELLO, MAX_BODY + 1))

        self.assertLogged(self.attack(onTLS=onTLS), ErrorCode.protocol_error)

    def test_truncatedFrame(self) -> None:
        """
        Half a C{HELLO}, then nothing: cut off at the handshake time-out.
        """

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(encodeFrame(Hello(b"h" * 32))[:20])

        connection = self.attack(onTLS=onTLS)
        self.assertEqual(self.refusals(), [])
        self.clock.advance(DEFAULT_TIMEOUT)
        connection.pump.flush()
        self.assertLogged(connection, ErrorCode.timeout)

    def test_slowloris(self) -> None:
        """
        A byte a second never extends the deadline.
        """
        connection = self.attack(onTLS=None)
        hello = encodeFrame(Hello(b"h" * 32))
        for i in range(int(DEFAULT_TIMEOUT)):
            connection.attacker.sendRaw(hello[i : i + 1])
            self.clock.advance(1)
            connection.pump.flush()
        self.assertLogged(connection, ErrorCode.timeout)

    def test_versionUnsupported(self) -> None:
        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(HEADER.pack(VERSION + 1, FrameType.HELLO, 0))

        self.assertLogged(self.attack(onTLS=onTLS), ErrorCode.version_unsupported)

    def test_dataBeforeApproval(self) -> None:
        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(encodeFrame(Hello(peer.challenge)) + b"GET / HTTP/1.1\r\n")

        self.assertLogged(self.attack(onTLS=onTLS), ErrorCode.protocol_error)

    def test_keyChange(self) -> None:
        """
        A known C{org/service} with a new key: C{identity_changed}, a warning
        naming both keys, no request to the owners, nothing stored.
        """
        impostor = makeIdentity("acme", "billing", slot="impostor")
        event = self.assertLogged(
            self.attack(impostor, onFrame=answerChallenge()),
            ErrorCode.identity_changed,
        )
        self.assertEqual(event["fingerprint"], impostor.fingerprint)
        [warning] = [
            e for e in self.events if e.get("event") == "dwtrust.identity_changed"
        ]
        self.assertEqual(warning["fingerprint"], impostor.fingerprint)
        self.assertEqual(warning["known"], self.legitimate.fingerprint)
        self.assertEqual(warning["peer_name"], "acme/billing")

    def test_revokedKeyReenters(self) -> None:
        """
        A revoked key, proving itself honestly, is refused with C{revoked}:
        logged, the owners not asked, its record still revoked.
        """
        recordDecision(
            self.server.store,
            self.server.identity,
            self.server.identity,
            PeerIdentity("acme", "billing", self.legitimate.publicKey),
            KeyState.revoked,
            "10.0.0.1:1234",
        )
        connection = self.attack(self.legitimate, onFrame=answerChallenge(after=b"app"))
        self.assertEqual(connection.attacker.errorCodes, [ErrorCode.revoked.value])
        self.assertIsNotNone(connection.attacker.lostReason)
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertEqual(len(self.server.fakeApprover.requests), self.requestsBefore)
        [event] = self.refusals()
        self.assertEqual(event["code"], ErrorCode.revoked.value)
        self.assertEqual(event["fingerprint"], self.legitimate.fingerprint)
        # The attempt is counted on the key's record (an audit trail), and
        # nothing else changes: still revoked, no other record, no pin.
        after, pins = snapshot(self.server.store)
        self.assertEqual(after.keys(), self.before[0].keys())
        self.assertEqual(pins, self.before[1])
        record = after[self.legitimate.fingerprint]
        self.assertIs(record.state, KeyState.revoked)
        earlier = self.before[0][self.legitimate.fingerprint]
        self.assertEqual(
            (record.decision, record.decidedBy), (earlier.decision, earlier.decidedBy)
        )


class PendingFloodTests(AttackCase):
    """
    A flood of new keys from one host, against the owners' approver: at most
    C{maxPendingPerSource} requests are kept, the rest are refused with
    C{unavailable} at once and stored nowhere, and a known client still gets
    in.
    """

    limit = 2
    flood = 6

    def setUp(self) -> None:
        super().setUp()
        store = MemoryTrustStore(now=self.clock.seconds)
        self.bus = ControlBus()
        self.published: list[object] = []
        self.bus.watch(self.published.append)
        approver = OwnersApprover(
            store, self.bus, maxPendingPerSource=self.limit, now=self.clock.seconds
        )
        self.server = makeService(
            self.clock, makeIdentity("acme", "ledger"), approver=approver, store=store
        )
        recordDecision(
            store,
            self.server.identity,
            self.server.identity,
            PeerIdentity("acme", "billing", self.legitimate.publicKey),
            KeyState.approved,
            "10.0.0.1:1234",
        )
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_flood(self) -> None:
        before = snapshot(self.server.store)
        connections = []
        for n in range(self.flood):
            attacker = ScriptedPeer(
                makeIdentity("evil", f"flood{n}", slot=f"flood{n}"),
                onTLS=sendHello,
                onFrame=answerChallenge(),
            )
            connections.append(connectScriptedClient(self.clock, self.server, attacker))
        held = [c for c in connections if not c.attacker.errorCodes]
        turnedAway = [c for c in connections if c.attacker.errorCodes]
        self.assertEqual(len(held), self.limit)
        for connection in turnedAway:
            self.assertEqual(
                connection.attacker.errorCodes, [ErrorCode.unavailable.value]
            )
            self.assertIsNotNone(connection.attacker.lostReason)
            self.assertEqual(connection.serverApp.connected, [])
        refused = [
            e
            for e in self.events
            if e.get("event") == "dwtrust.refused"
            and e["code"] == ErrorCode.unavailable.value
        ]
        self.assertEqual(len(refused), self.flood - self.limit)
        # Only the held keys were stored, as pending.
        added = {
            fp: record
            for fp, record in self.server.store.peers.items()
            if fp not in before[0]
        }
        self.assertEqual(
            {r.fingerprint for r in added.values()},
            {
                c.serverHandshake.peer.fingerprint
                for c in held
                if c.serverHandshake.peer
            },
        )
        self.assertTrue(all(r.state is KeyState.pending for r in added.values()))
        # A known client is not held up by the flood.
        known = connectScriptedClient(
            self.clock,
            self.server,
            ScriptedPeer(
                self.legitimate, onTLS=sendHello, onFrame=answerChallenge(after=b"hi")
            ),
        )
        [app] = known.serverApp.connected
        self.assertEqual(app.received, b"hi")
        # A request turned away stops its wait for a decision quietly: no
        # unhandled CancelledError reaches the log.
        del connections, turnedAway, held
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])


class SQLitePendingFloodTests(TestCase):
    """
    The same flood against the owners' approver over the real SQLite store
    (not the in-memory one the tests above use): the store's own
    per-source cap keeps C{maxPendingPerSource} requests, refuses the rest
    with C{unavailable} and stores nothing for them, while a request from
    another host is still kept.
    """

    limit = 2
    flood = 6

    async def floodTheStore(self) -> None:
        clock = Clock()
        path = temporaryDirectory(self).child("trust.sqlite3")
        store = await SQLiteStore.open(path, clock.seconds)
        self.addCleanup(store.close)
        # The per-source cap is the store's alone: the approver's total is
        # left wide open.
        approver = OwnersApprover(
            store,
            ControlBus(),
            maxPending=1000,
            maxPendingPerSource=self.limit,
            now=clock.seconds,
        )
        waiting = []
        refused = []
        for n in range(self.flood + 1):
            source = SOURCE if n < self.flood else "10.9.9.9:1"
            identity = makeIdentity("evil", f"flood{n}", slot=f"flood{n}")
            peer = PeerIdentity("evil", f"flood{n}", identity.publicKey)
            asked = approver.requestApproval(
                ApprovalRequest(peer, source, "acme/ledger")
            )
            outcome: list[object] = []
            asked.addBoth(outcome.append)
            # Until the store's thread answers: a refusal, or a kept request.
            while not outcome and await store.lookup(peer.fingerprint) is None:
                await deferLater(reactor, 0.01, lambda: None)
            if outcome:
                refused.append(outcome[0])
            else:
                waiting.append(asked)
        self.assertEqual(len(waiting), self.limit + 1)
        self.assertEqual(len(refused), self.flood - self.limit)
        for failure in refused:
            assert isinstance(failure, Failure)
            self.assertIsInstance(failure.value, Refusal)
            self.assertIs(failure.value.code, ErrorCode.unavailable)
        pending = await store.pending()
        self.assertEqual(len(pending), self.limit + 1)
        self.assertEqual(
            sorted(r.service for r in pending),
            sorted([f"flood{n}" for n in range(self.limit)] + [f"flood{self.flood}"]),
        )
        for asked in waiting:
            asked.cancel()
            asked.addErrback(lambda f: f.trap(CancelledError))

    def test_flood(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.floodTheStore())


class DecisionForAnotherServiceTests(SynchronousTestCase):
    """
    A decision names the service it is for: one signed for another service
    name counts for nothing here, even when that service has this service's
    very key (so the decision's service key matches, and only its name can
    refuse it).
    """

    def test_approvalForAnotherNameOfTheSameKey(self) -> None:
        service = makeIdentity("acme", "ledger")
        sameKey = Identity.fromPrivateKey("acme", "other", service.privateKey)
        self.assertEqual(sameKey.fingerprint, service.fingerprint)
        store = MemoryTrustStore()
        approver = FakeApprover()
        policy = ApprovalPolicy(store, approver, service)
        peer = PeerIdentity(
            "acme", "billing", makeIdentity("acme", "billing").publicKey
        )
        self.successResultOf(
            recordDecision(store, service, sameKey, peer, KeyState.approved)
        )
        checking = policy.check(peer, "10.9.9.9:1")
        # Not let in: treated as unknown, so the approver is asked.
        self.assertNoResult(checking)
        self.assertEqual(len(approver.requests), 1)
        self.assertEqual(len(self.flushLoggedErrors()), 0, "no error was logged")


class ReflectedProofTests(AttackCase):
    """
    A proof made for this very connection, but in the server's role: the role
    is signed, so it is C{bad_signature}, and logged.
    """

    def test_reflectedRole(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return makeProof(
                self.legitimate, Role.server, frame.challenge, peer.exporter
            )

        self.assertRefused(
            self.attack(self.legitimate, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )
        [event] = [e for e in events if e.get("event") == "dwtrust.refused"]
        self.assertEqual(event["code"], ErrorCode.bad_signature.value)
