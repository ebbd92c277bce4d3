"""
Tests for L{dwtrust.control}: the owners' control channel, in memory over
real dwtrust (real TLS, the real handshake), between a service's
L{controlFactory} behind L{OwnersOnlyPolicy} and an owner's L{ControlClient}.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dwtrust import (
    Authenticator,
    ErrorCode,
    HandshakeFailed,
    Identity,
    IdentityError,
    ITrustPolicy,
    PeerIdentity,
    PinningPolicy,
    Refusal,
)
from dwtrust._authority import Decisions
from dwtrust._decision import SignedDecision, Signers
from dwtrust.control import (
    ControlBus,
    ControlClient,
    ControlMessage,
    ControlProtocol,
    ControlServer,
    Decide,
    DecisionRefused,
    ListPending,
    OwnersOnlyPolicy,
    controlFactory,
    signDecision,
    subjectOf,
)
from dwtrust.control._protocol import (
    PAGE_BYTES,
    decodeMessage,
    encodeMessage,
    matches,
    page,
)
from dwtrust.control._server import ControlFactory
from dwtrust.store import KeyRecord, KeyState
from dwtrust.store._newest import NewestDecisions
from dwtrust.testing import MemoryTrustStore, connectInMemory, recordDecision

from .helpers import makeIdentity

T = TypeVar("T")

SERVICE = "acme/ledger"
SOURCE = "10.1.2.3:40000"
NOW = 1_700_000_000.0


def peerOf(identity: Identity) -> PeerIdentity:
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


class ClientFactory(Factory):
    """
    Builds the owner's L{ControlProtocol}s, and keeps them.
    """

    def __init__(self) -> None:
        self.protocols: list[ControlProtocol] = []

    def buildProtocol(self, addr: IAddress | None) -> ControlProtocol:
        protocol = ControlProtocol()
        self.protocols.append(protocol)
        return protocol


class ControlTestCase(SynchronousTestCase):
    """
    A service, C{acme/ledger}, with one registered owner, C{acme/alice}, and
    its control channel; and C{acme/mallory}, who is no owner.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.daemon = makeIdentity("acme", "ledger")
        self.owner = makeIdentity("acme", "alice")
        self.stranger = makeIdentity("acme", "mallory")
        self.store = MemoryTrustStore(now=self.clock.seconds)
        self.bus = ControlBus()
        self.owners = Signers([self.owner.publicKey])
        self.server = Authenticator(
            self.daemon, OwnersOnlyPolicy(self.owners), None, self.clock
        )
        self.decisions = Decisions(
            self.daemon,
            self.store,
            self.owners,
            NewestDecisions.inMemory(),
            self.bus,
            self.clock.seconds,
            self.clock,
        )
        self.factory = controlFactory(self.decisions, self.bus)
        self.servers: list[ControlServer] = []
        assert isinstance(self.factory, ControlFactory)
        build = self.factory.buildProtocol

        def buildProtocol(addr: IAddress | None) -> ControlServer:
            protocol = build(addr)
            self.servers.append(protocol)
            return protocol

        self.factory.buildProtocol = buildProtocol  # type: ignore[method-assign]
        self.billing = peerOf(makeIdentity("acme", "billing"))
        self.billingNew = peerOf(makeIdentity("acme", "billing", slot="new"))
        self.clientStore = MemoryTrustStore(now=self.clock.seconds)

    def connectOwner(
        self,
        identity: Identity | None = None,
        connected: bool = True,
        versions: tuple[int, ...] = (2, 1),
    ) -> ControlClient:
        """
        Connect C{identity} (by default, the owner) to the control channel,
        and check that the connection is (or is not) still open.
        """
        identity = identity if identity is not None else self.owner
        client = Authenticator(
            identity,
            None,
            PinningPolicy(self.clientStore),
            self.clock,
            versions=versions,
        )
        clientFactory = ClientFactory()
        _, _, self.pump = connectInMemory(
            self.server, self.factory, client, clientFactory, self.clock
        )
        [protocol] = clientFactory.protocols
        self.assertEqual(protocol.lostReason is None, connected)
        return ControlClient(protocol, peerOf(self.daemon))

    def result(self, d: Deferred[T]) -> T:
        """
        Run the connection until it is quiet, and the result of C{d}.
        """
        self.pump.flush()
        return self.successResultOf(d)

    def failure(self, d: Deferred[Any], *errors: type[Exception]) -> Exception:
        self.pump.flush()
        failure = self.failureResultOf(d, *errors)
        assert isinstance(failure.value, Exception)
        return failure.value

    def addPending(
        self, peer: PeerIdentity, requestId: str, source: str = SOURCE
    ) -> KeyRecord:
        record, created = self.successResultOf(
            self.store.addPending(peer, source, requestId, NOW + 3600, 10, 100)
        )
        self.assertTrue(created)
        return record

    def approve(self, peer: PeerIdentity, signer: Identity | None = None) -> None:
        self.successResultOf(
            recordDecision(
                self.store,
                signer or self.owner,
                self.daemon,
                peer,
                KeyState.approved,
                source="10.9.9.9:1000",
                now=NOW - 100,
            )
        )


class OwnersOnlyPolicyTests(SynchronousTestCase):
    """
    L{OwnersOnlyPolicy} lets in the owners' keys, and no other.
    """

    def setUp(self) -> None:
        self.owner = makeIdentity("acme", "alice")
        self.policy = OwnersOnlyPolicy(Signers([self.owner.publicKey]))

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ITrustPolicy, self.policy))

    def test_owner(self) -> None:
        self.assertIsNone(
            self.successResultOf(self.policy.check(peerOf(self.owner), SOURCE))
        )

    def test_stranger(self) -> None:
        """
        Any other key is refused with C{denied}, naming its fingerprint, even
        one that claims the owner's name.
        """
        impostor = makeIdentity("acme", "alice", slot="impostor")
        refusal = self.failureResultOf(
            self.policy.check(peerOf(impostor), SOURCE), Refusal
        ).value
        assert isinstance(refusal, Refusal)
        self.assertEqual(refusal.code, ErrorCode.denied)
        self.assertIn(impostor.fingerprint, refusal.message)
        self.assertIn("not a registered owner", refusal.message)


class ConnectionTests(ControlTestCase):
    """
    Who may open the control channel.
    """

    def test_nonOwnerRefused(self) -> None:
        """
        A key that is not a registered owner's is refused with C{denied}
        during the handshake: the service's control protocol is never
        connected, nothing is stored, and the owner's calls fail with the
        refusal.
        """
        # Version 1, whose client is connected before the server decides
        # (in version 2 a refused client's application is never connected).
        client = self.connectOwner(self.stranger, connected=False, versions=(1,))
        lost = client.protocol.lostReason
        assert lost is not None
        failed = lost.value
        assert isinstance(failed, HandshakeFailed)
        self.assertEqual((failed.code, failed.byPeer), (ErrorCode.denied, True))
        self.assertIn("not a registered owner", failed.message)
        self.assertEqual(self.failure(client.pending(), HandshakeFailed), failed)
        self.assertEqual([p.transport for p in self.servers], [None])
        self.assertEqual(self.store.peers, {})

    def test_ownerConnects(self) -> None:
        """
        The owner's client sees the service's proven identity, and the name
        its decisions must carry.
        """
        client = self.connectOwner()
        peer = client.protocol.transport.peer  # type: ignore[union-attr]
        self.assertEqual(peer.fingerprint, self.daemon.fingerprint)
        self.assertEqual(client.service, SERVICE)
        self.assertEqual(len(self.clientStore.pins), 1, "the service is pinned")

    def test_unwrappedServerDropsStrangers(self) -> None:
        """
        A L{ControlServer} that is reached without dwtrust (a misconfigured
        service) drops the connection rather than answer.
        """
        protocol = self.factory.buildProtocol(None)
        assert isinstance(protocol, ControlServer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(protocol.owner)


class ListTests(ControlTestCase):
    """
    C{ListPending} and C{ListPeers}.
    """

    def test_pendingEmpty(self) -> None:
        client = self.connectOwner()
        listing = self.result(client.pending())
        self.assertEqual((listing.entries, listing.total, listing.omitted), ((), 0, 0))

    def test_pending(self) -> None:
        """
        A pending entry tells an owner what they need to decide: who asks,
        from where, since when, how often, until when, the key itself, and
        the other keys known for the same org/service with their states.
        """
        self.approve(self.billing)
        self.clock.advance(10)
        self.addPending(self.billingNew, "0123456789")
        client = self.connectOwner()
        listing = self.result(client.pending())
        self.assertEqual(listing.total, 1)
        [entry] = listing.entries
        self.assertEqual(
            {k: v for k, v in entry.items() if k != "publicKey"},
            {
                "id": "0123456789",
                "fingerprint": self.billingNew.fingerprint,
                "org": "acme",
                "service": "billing",
                "algorithm": "ssh-ed25519",
                "source": SOURCE,
                "firstSeen": NOW + 10,
                "lastSeen": NOW + 10,
                "attempts": 1,
                "expires": NOW + 3600,
                "knownKeys": [
                    {"fingerprint": self.billing.fingerprint, "state": "approved"}
                ],
                "knownKeysOmitted": 0,
                "sequence": 0,
            },
        )
        self.assertEqual(subjectOf(entry), self.billingNew)
        self.assertTrue(entry["publicKey"].endswith(" acme/billing"))

    def test_peers(self) -> None:
        """
        C{ListPeers} lists the keys with a decision, and not the pending ones.
        """
        self.approve(self.billing)
        self.addPending(self.billingNew, "0123456789")
        client = self.connectOwner()
        listing = self.result(client.peers())
        [entry] = listing.entries
        self.assertEqual(entry["fingerprint"], self.billing.fingerprint)
        self.assertEqual(entry["state"], "approved")
        self.assertEqual(entry["decidedBy"], self.owner.fingerprint)
        self.assertEqual(entry["source"], "10.9.9.9:1000")
        self.assertEqual(subjectOf(entry), self.billing)
        self.assertEqual(
            sorted(entry),
            sorted(
                [
                    "fingerprint",
                    "org",
                    "service",
                    "algorithm",
                    "publicKey",
                    "state",
                    "decidedBy",
                    "firstSeen",
                    "lastSeen",
                    "attempts",
                    "source",
                    "sentBy",
                    "sequence",
                ]
            ),
        )
        self.assertEqual(
            (entry["sequence"], entry["sentBy"]), (1, self.owner.fingerprint)
        )

    def test_prefix(self) -> None:
        """
        A prefix of a request ID or of a fingerprint (with or without
        C{SHA256:}) filters the list on the service's side.
        """
        self.addPending(self.billing, "aaaa000001")
        self.addPending(self.billingNew, "bbbb000002")
        client = self.connectOwner()
        byId = self.result(client.pending("AAAA"))
        self.assertEqual([e["id"] for e in byId.entries], ["aaaa000001"])
        fingerprint = self.billingNew.fingerprint
        for prefix in [fingerprint[:12], fingerprint[len("SHA256:") :][:6]]:
            found = self.result(client.pending(prefix))
            self.assertEqual([e["id"] for e in found.entries], ["bbbb000002"])
        self.assertEqual(self.result(client.pending("zz")).total, 0)

    def test_pages(self) -> None:
        """
        A list too long for one AMP value arrives in pages, each under the
        limit, and the client gathers them all; with a limit, it says how many
        it left out.
        """
        for i in range(620):
            peer = peerOf(makeIdentity("acme", f"svc{i}", algorithm="ed25519"))
            self.successResultOf(
                self.store.addPending(
                    peer,
                    f"10.{i // 250}.{i % 250}.1:1",
                    f"{i:010x}",
                    NOW + 60,
                    10,
                    1000,
                )
            )
        client = self.connectOwner()
        sizes: list[int] = []
        original = client.protocol.ampBoxReceived

        def measure(box: amp.AmpBox) -> None:
            sizes.extend(len(v) for v in box.values())
            original(box)

        client.protocol.ampBoxReceived = measure  # type: ignore[method-assign]
        listing = self.result(client.pending())
        self.assertEqual(listing.total, 620)
        self.assertEqual(
            [e["id"] for e in listing.entries], [f"{i:010x}" for i in range(620)]
        )
        self.assertLessEqual(max(sizes), PAGE_BYTES)
        limited = self.result(client.pending(limit=100))
        self.assertEqual((len(limited.entries), limited.omitted), (100, 520))

    def test_pageSize(self) -> None:
        """
        L{page} keeps under L{PAGE_BYTES} however large the entries, and always
        holds at least one.
        """
        entries = [{"blob": "x" * 9000, "n": i} for i in range(20)]
        text = page(entries, 0, 20)
        self.assertLessEqual(len(text), PAGE_BYTES)
        received = json.loads(text)
        self.assertEqual(received["total"], 20)
        self.assertTrue(0 < len(received["entries"]) < 20)
        single = json.loads(page([{"blob": "x" * 70_000}], 3, 4))
        self.assertEqual((len(single["entries"]), single["offset"]), (1, 3))


class DecideTests(ControlTestCase):
    """
    C{Decide}: an owner's signed decision, verified, stored, and delivered to
    whoever waits for it.
    """

    def setUp(self) -> None:
        super().setUp()
        self.addPending(self.billing, "0123456789")
        self.client = self.connectOwner()
        self.published: list[ControlMessage] = []
        self.bus.watch(self.published.append)
        self.waiting = self.bus.waitFor(self.billing.fingerprint)

    def decision(
        self,
        state: str = "approved",
        signer: Identity | None = None,
        service: str = SERVICE,
        subject: PeerIdentity | None = None,
        sequence: int = 1,
        serviceKey: str | None = None,
    ) -> SignedDecision:
        return SignedDecision.make(
            signer or self.owner,
            service,
            subject or self.billing,
            state,
            NOW + 5,
            "I know this box",
            serviceKey or self.daemon.fingerprint,
            sequence,
        )

    def stored(self, peer: PeerIdentity) -> KeyRecord:
        record = self.successResultOf(self.store.lookup(peer.fingerprint))
        assert record is not None
        return record

    def assertRefused(self, encoded: bytes, *words: str) -> None:
        """
        Sending C{encoded} fails with L{DecisionRefused} saying C{words}; the
        store is unchanged and nobody hears of a decision.
        """
        before = (dict(self.store.peers), repr(self.store.history))
        protocol: amp.AMP = self.client.protocol

        async def send() -> object:
            # Awaited at once: AMP drops a connection whose call fails with
            # nothing yet listening.
            return await protocol.callRemote(Decide, decision=encoded)

        d = Deferred.fromCoroutine(send())
        error = self.failure(d, DecisionRefused)
        for word in words:
            self.assertIn(word, str(error))
        self.assertEqual((dict(self.store.peers), repr(self.store.history)), before)
        self.assertNoResult(self.waiting)
        self.assertEqual([m for m in self.published if m.kind == "decided"], [])
        # The connection is still open: it answers.
        self.result(self.client.peers())

    def test_approve(self) -> None:
        """
        An owner's approval is stored with its signature, which verifies, and
        wakes the connections that wait for it.
        """
        decision = self.decision()
        record = self.result(self.client.decide(decision))
        self.assertEqual(
            (record["fingerprint"], record["state"], record["decidedBy"]),
            (self.billing.fingerprint, "approved", self.owner.fingerprint),
        )
        stored = self.stored(self.billing)
        self.assertEqual(stored.state, KeyState.approved)
        self.assertEqual(stored.source, SOURCE)
        self.assertEqual(stored.decidedBy, self.owner.fingerprint)
        self.assertEqual(stored.sentBy, self.owner.fingerprint)
        self.assertEqual(stored.sequence, 1)
        self.assertEqual(record["stored"], True)
        again = SignedDecision.decode(stored.decision)
        self.assertEqual(again, decision)
        self.owners.verify(again, SERVICE, self.daemon.fingerprint)
        self.assertEqual(self.successResultOf(self.waiting), decision)
        [decided] = [m for m in self.published if m.kind == "decided"]
        self.assertEqual(
            (decided.state, decided.decidedBy), ("approved", self.owner.fingerprint)
        )

    def test_deny(self) -> None:
        self.result(self.client.decide(self.decision("denied")))
        self.assertEqual(self.stored(self.billing).state, KeyState.denied)
        self.assertEqual(self.successResultOf(self.waiting).state, "denied")

    def test_block(self) -> None:
        """
        A key never seen can be blocked ahead of time, by its key.
        """
        stranger = peerOf(makeIdentity("evil", "scanner"))
        self.result(self.client.decide(self.decision("blocked", subject=stranger)))
        stored = self.stored(stranger)
        self.assertEqual((stored.state, stored.source), (KeyState.blocked, ""))

    def test_revoke(self) -> None:
        """
        Revoking an approved key stores C{revoked}, with the owner's
        signature.
        """
        self.approve(self.billingNew)
        revocation = self.decision("revoked", subject=self.billingNew, sequence=2)
        record = self.result(self.client.decide(revocation))
        self.assertEqual(record["state"], "revoked")
        stored = self.stored(self.billingNew)
        self.assertEqual(stored.state, KeyState.revoked)
        self.assertEqual(stored.source, "10.9.9.9:1000")
        self.assertEqual(SignedDecision.decode(stored.decision), revocation)
        self.owners.verify(
            SignedDecision.decode(stored.decision), SERVICE, self.daemon.fingerprint
        )

    def test_olderDecisionRefused(self) -> None:
        """
        After a revocation (decision 2), the approval it replaced (decision
        1), sent again by another owner, is refused as not newer: the key
        stays revoked, and nothing is stored.
        """
        bob = makeIdentity("acme", "bob")
        self.owners.add(bob.publicKey)
        approval = self.decision("approved", sequence=1)
        self.result(self.client.decide(approval))
        self.result(self.client.decide(self.decision("revoked", sequence=2)))
        self.waiting = self.bus.waitFor(self.billing.fingerprint)
        self.published.clear()
        self.client = self.connectOwner(bob)
        self.assertRefused(approval.encode(), "not newer", "(2)")
        stored = self.stored(self.billing)
        self.assertEqual((stored.state, stored.sequence), (KeyState.revoked, 2))

    def test_sameDecisionAgainRefused(self) -> None:
        """
        The decision in force, sent again, is refused as in force already.
        """
        approval = self.decision("approved", sequence=1)
        self.result(self.client.decide(approval))
        self.waiting = self.bus.waitFor(self.billing.fingerprint)
        self.published.clear()
        self.assertRefused(approval.encode(), "in force already")

    def test_conflictingDecisionRefused(self) -> None:
        """
        A second decision at a place in the key's history that another
        owner's decision took meanwhile is refused.
        """
        self.result(self.client.decide(self.decision("approved", sequence=1)))
        self.waiting = self.bus.waitFor(self.billing.fingerprint)
        self.published.clear()
        self.assertRefused(self.decision("denied", sequence=1).encode(), "not newer")

    def test_sentByAndSignedByRecorded(self) -> None:
        """
        The store records who sent a decision as well as who signed it.
        """
        bob = makeIdentity("acme", "bob")
        self.owners.add(bob.publicKey)
        signedByAlice = self.decision("approved", sequence=1)
        bobsClient = self.connectOwner(bob)
        record = self.result(bobsClient.decide(signedByAlice))
        self.assertEqual(
            (record["decidedBy"], record["sentBy"]),
            (self.owner.fingerprint, bob.fingerprint),
        )
        stored = self.stored(self.billing)
        self.assertEqual(
            (stored.decidedBy, stored.sentBy), (self.owner.fingerprint, bob.fingerprint)
        )

    def test_anotherServiceOfTheSameName(self) -> None:
        """
        A decision signed for another service with the same name (but its own
        key) is refused.
        """
        twin = makeIdentity("acme", "ledger", slot="twin")
        self.assertRefused(
            self.decision(serviceKey=twin.fingerprint).encode(), twin.fingerprint
        )

    def test_version1Refused(self) -> None:
        """
        A version 1 decision (no service key, no place in history) is refused
        over the control channel.
        """
        current = self.decision()
        old = evolve(current, serviceKey="", sequence=0, signature=b"")
        old = evolve(old, signature=self.owner.sign(old.payload()))
        self.assertEqual(old.version, 1)
        self.assertRefused(old.encode(), "version 1")

    def test_signedByNonOwner(self) -> None:
        self.assertRefused(
            self.decision(signer=self.stranger).encode(),
            self.stranger.fingerprint,
            "not a registered owner",
        )

    def test_signedByTheService(self) -> None:
        """
        Over the control channel, only the owners given count: not even the
        service's own key.
        """
        self.assertRefused(
            self.decision(signer=self.daemon).encode(), "not a registered owner"
        )

    def test_anotherService(self) -> None:
        self.assertRefused(
            self.decision(service="acme/other").encode(), "acme/other", SERVICE
        )

    def test_tampered(self) -> None:
        """
        A decision changed after it was signed (a denial turned approval) does
        not verify.
        """
        forged = evolve(self.decision("denied"), state="approved")
        self.assertRefused(forged.encode(), "signature does not verify")

    def test_keySwapped(self) -> None:
        """
        A decision whose key does not match its fingerprint is refused.
        """
        signed = self.decision()
        swapped = evolve(signed, publicKey=self.billingNew.publicKey.blob)
        self.assertRefused(swapped.encode())

    def test_malformed(self) -> None:
        self.assertRefused(b"not a decision", "malformed")

    def test_notADecision(self) -> None:
        """
        C{pending} is a key's state, not a decision anyone can sign.
        """
        unsigned = evolve(self.decision(), state="pending")
        signed = evolve(unsigned, signature=self.owner.sign(unsigned.payload()))
        self.assertRefused(signed.encode(), "'pending'")

    def test_renamed(self) -> None:
        """
        A decision must name the key as the store knows it: the same key under
        another org/service is refused.
        """
        renamed = PeerIdentity("acme", "payroll", self.billing.publicKey)
        self.assertRefused(
            self.decision(subject=renamed).encode(), "acme/payroll", "acme/billing"
        )

    def test_signDecision(self) -> None:
        """
        L{signDecision} signs a decision about the key a listed entry shows.
        """
        [entry] = self.result(self.client.pending()).entries
        decision = signDecision(
            self.owner, self.client.peer, entry, "approved", NOW, "ok"
        )
        self.owners.verify(decision, SERVICE, self.daemon.fingerprint)
        self.assertEqual(decision.sequence, entry["sequence"] + 1)
        self.assertEqual(decision.fingerprint, self.billing.fingerprint)

    def test_entryWithAnotherKey(self) -> None:
        """
        An entry whose key does not match its fingerprint is not signed.
        """
        [entry] = self.result(self.client.pending()).entries
        entry = {
            **entry,
            "publicKey": self.billingNew.publicKey.openssh(),
        }
        self.assertRaises(
            IdentityError,
            signDecision,
            self.owner,
            peerOf(self.daemon),
            entry,
            "approved",
            NOW,
            "",
        )


class WatchTests(ControlTestCase):
    """
    C{Watch} and C{Notify}.
    """

    def test_watch(self) -> None:
        """
        After C{watch}, every message on the bus reaches the owner, until the
        connection closes.
        """
        client = self.connectOwner()
        received: list[ControlMessage] = []
        self.result(client.watch(received.append))
        message = ControlMessage(
            "approval_requested",
            SERVICE,
            self.billing.fingerprint,
            org="acme",
            peerService="billing",
            algorithm="ssh-ed25519",
            source=SOURCE,
            requestId="0123456789",
            firstSeen=NOW,
            attempts=2,
            knownKeys=(self.billingNew.fingerprint,),
            reason="acme/billing wants to connect to acme/ledger",
            time=NOW,
        )
        self.bus.publish(message)
        self.pump.flush()
        self.assertEqual(received, [message])
        self.result(client.close())
        self.bus.publish(message)
        self.pump.flush()
        self.assertEqual(received, [message])

    def test_decisionsWatched(self) -> None:
        """
        One owner's decision reaches another owner's watch as C{decided}.
        """
        self.addPending(self.billing, "0123456789")
        watcher = self.connectOwner()
        watchPump = self.pump
        received: list[ControlMessage] = []
        self.result(watcher.watch(received.append))
        decider = self.connectOwner()
        decision = SignedDecision.make(
            self.owner,
            SERVICE,
            self.billing,
            "approved",
            NOW,
            "fine",
            self.daemon.fingerprint,
            1,
        )
        self.result(decider.decide(decision))
        watchPump.flush()
        [message] = received
        self.assertEqual(
            (message.kind, message.fingerprint, message.state, message.reason),
            ("decided", self.billing.fingerprint, "approved", "fine"),
        )

    def test_slowOwner(self) -> None:
        """
        While an owner's connection is too slow to take more, messages are
        counted instead of buffered; once it flows again, the owner hears how
        many were dropped, and the messages flow again.
        """
        client = self.connectOwner()
        [server] = self.servers
        received: list[ControlMessage] = []
        self.result(client.watch(received.append))
        server.pauseProducing()
        for i in range(5):
            self.bus.publish(ControlMessage("expired", SERVICE, f"SHA256:{i}"))
        self.pump.flush()
        self.assertEqual((received, server.dropped), ([], 5))
        server.resumeProducing()
        self.bus.publish(ControlMessage("expired", SERVICE, "SHA256:last"))
        self.pump.flush()
        self.assertEqual(
            [(m.kind, m.attempts, m.fingerprint) for m in received],
            [("dropped", 5, ""), ("expired", 0, "SHA256:last")],
        )
        self.assertIn("5 control messages were dropped", received[0].reason)

    def test_largeMessage(self) -> None:
        """
        A message too large for one AMP value is shortened, not lost.
        """
        message = ControlMessage(
            "identity_changed",
            SERVICE,
            self.billing.fingerprint,
            knownKeys=tuple(f"SHA256:{i:043d}" for i in range(2000)),
            time=NOW,
        )
        text = encodeMessage(message)
        self.assertLessEqual(len(text), PAGE_BYTES)
        self.assertEqual(len(decodeMessage(text).knownKeys), 20)

    def test_malformedNotifyIgnored(self) -> None:
        protocol = ControlProtocol()
        received: list[ControlMessage] = []
        protocol.onMessage = received.append
        self.assertEqual(protocol.notify("[1, 2]"), {})
        self.assertEqual(protocol.notify('{"kind": "x"}'), {})
        self.assertEqual(received, [])


class MatchTests(SynchronousTestCase):
    """
    L{matches}: prefixes of request IDs and fingerprints.
    """

    entry = {"id": "3f2a9c01de", "fingerprint": "SHA256:AbCdEf0123"}

    def test_matches(self) -> None:
        for prefix in [
            "3f",
            "3F2A",
            "3f2a9c01de",
            "Ab",
            "SHA256:AbC",
            "sha256:AbCd",
            " Ab ",
        ]:
            self.assertTrue(matches(prefix, self.entry), prefix)

    def test_noMatch(self) -> None:
        for prefix in ["3g", "ab", "SHA256:ab", "3f2a9c01de0"]:
            self.assertFalse(matches(prefix, self.entry), prefix)


class CommandsTests(SynchronousTestCase):
    """
    The commands' names on the wire are fixed: other clients speak them.
    """

    def test_names(self) -> None:
        from dwtrust import control

        self.assertEqual(
            {
                name: getattr(control, name).commandName
                for name in ["ListPending", "ListPeers", "Decide", "Watch", "Notify"]
            },
            {
                "ListPending": b"ListPending",
                "ListPeers": b"ListPeers",
                "Decide": b"Decide",
                "Watch": b"Watch",
                "Notify": b"Notify",
            },
        )
        self.assertEqual(ListPending.commandName, b"ListPending")


class BoundedCloseTests(SynchronousTestCase):
    """
    L{ControlClient.close} never waits forever for a service that does not
    finish closing: after its grace period it aborts.
    """

    def test_abortsAfterGrace(self) -> None:
        from twisted.internet.task import Clock

        from dwtrust.control._client import CLOSE_GRACE, ControlClient

        calls: list[str] = []
        closed: Deferred[None] = Deferred()

        class Transport:
            def loseConnection(self) -> None:
                calls.append("lose")

            def abortConnection(self) -> None:
                calls.append("abort")
                closed.callback(None)

        class Protocol:
            transport = Transport()

            def whenClosed(self) -> Deferred[None]:
                return closed

        clock = Clock()
        client = ControlClient(Protocol(), None)  # type: ignore[arg-type]
        closing = client.close(clock)
        self.assertEqual(calls, ["lose"])
        self.assertNoResult(closing)
        clock.advance(CLOSE_GRACE)
        self.assertEqual(calls, ["lose", "abort"])
        self.successResultOf(closing)
        self.assertEqual(clock.getDelayedCalls(), [])
