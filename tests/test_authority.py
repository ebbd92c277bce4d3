"""
Tests for L{dwtrust._authority}: which decision about a key is in force, and
how new ones are applied; and L{dwtrust.store._newest}, the instance's own
memory of the newest decision about each key.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import ErrorCode, PeerIdentity, Refusal
from dwtrust._authority import Applied, DecisionRejected, Decisions
from dwtrust._bus import ControlBus, ControlMessage
from dwtrust._decision import SignedDecision, Signers
from dwtrust._policy import ApprovalPolicy
from dwtrust.approval import OwnersApprover
from dwtrust.store import KeyRecord, KeyState, StoreChange
from dwtrust.store._newest import NewestDecisions
from dwtrust.testing import FakeApprover, MemoryTrustStore

from .deciding import sign
from .helpers import makeIdentity
from .test_store import temporaryDirectory

NOW = 1_700_000_000.0


def peerOf(identity: Any) -> PeerIdentity:
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


def events(case: SynchronousTestCase, name: str) -> list[dict[str, Any]]:
    observer = EventLoggingObserver.createWithCleanup(case, globalLogPublisher)
    found: list[dict[str, Any]] = []
    original = observer.__call__

    def record(event: dict[str, Any]) -> None:
        original(event)
        if event.get("event") == name:
            found.append(event)

    globalLogPublisher.removeObserver(observer)
    globalLogPublisher.addObserver(record)
    case.addCleanup(globalLogPublisher.removeObserver, record)
    return found


class FailingStore(MemoryTrustStore):
    """
    A store whose writes fail while C{failing} is set, as a full disk's do.
    """

    failing = False

    def record(self, *args: Any, **kwargs: Any) -> Deferred[KeyRecord]:
        if self.failing:
            return fail(sqlite3.OperationalError("database or disk is full"))
        return super().record(*args, **kwargs)


class Session:
    """
    An open session, as L{Decisions.sessions} lists them.
    """

    def __init__(self) -> None:
        self.aborted = False
        self.transport = self

    def abortConnection(self) -> None:
        self.aborted = True


class DecisionsTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = makeIdentity("acme", "ledger")
        self.alice = makeIdentity("acme", "alice")
        self.bob = makeIdentity("acme", "bob")
        self.billing = peerOf(makeIdentity("acme", "billing"))
        self.store = FailingStore(now=self.clock.seconds)
        self.bus = ControlBus()
        self.messages: list[ControlMessage] = []
        self.bus.watch(self.messages.append)
        self.newest = NewestDecisions.inMemory()
        self.decisions = Decisions(
            self.service,
            self.store,
            Signers([self.alice.publicKey, self.bob.publicKey]),
            self.newest,
            self.bus,
            self.clock.seconds,
            self.clock,
        )
        self.sessions: dict[str, list[Session]] = {}
        self.decisions.sessions = lambda fp: self.sessions.get(fp, [])
        self.policy = ApprovalPolicy(
            self.store,
            FakeApprover(),
            self.service,
            bus=self.bus,
            decisions=self.decisions,
        )

    def sign(self, state: str, sequence: int, signer: Any = None) -> SignedDecision:
        return sign(
            signer or self.alice,
            self.service,
            self.billing,
            state,
            NOW,
            f"{state} in a test",
            sequence,
        )

    def apply(self, decision: SignedDecision, sender: Any = None) -> Applied:
        return self.successResultOf(
            Deferred.fromCoroutine(
                self.decisions.apply(decision.encode(), peerOf(sender or self.alice))
            )
        )

    def rejected(self, decision: SignedDecision, sender: Any = None) -> str:
        failure = self.failureResultOf(
            Deferred.fromCoroutine(
                self.decisions.apply(decision.encode(), peerOf(sender or self.alice))
            ),
            DecisionRejected,
        )
        return str(failure.value)

    def lookup(self) -> KeyRecord:
        record = self.successResultOf(self.store.lookup(self.billing.fingerprint))
        assert record is not None
        return record

    def refusal(self) -> Refusal:
        failure = self.failureResultOf(
            self.policy.check(self.billing, "10.1.1.1:1"), Refusal
        )
        assert isinstance(failure.value, Refusal)
        return failure.value


class RollbackTests(DecisionsTestCase):
    """
    Trust never goes backwards.
    """

    def test_storeRolledBack(self) -> None:
        """
        After a revocation, a store that shows the older approval again (its
        newer row removed behind dwtrust's back) does not let the key in:
        the revocation this instance saw stays in force, and the rollback is
        logged and reported to the owners, once.
        """
        self.apply(self.sign("approved", 1))
        self.apply(self.sign("revoked", 2))
        del self.store.history[self.billing.fingerprint][2]
        self.assertEqual(self.lookup().state, KeyState.approved)
        logged = events(self, "dwtrust.rollback")
        self.assertIs(self.refusal().code, ErrorCode.revoked)
        self.assertIs(self.refusal().code, ErrorCode.revoked)
        self.assertEqual(len(logged), 1)
        self.assertIn("decision 1 (approved)", logged[0]["found"])
        self.assertEqual(logged[0]["sequence"], 2)
        self.assertEqual([m.kind for m in self.messages].count("rollback"), 1)

    def test_olderDecisionFiledAsNewer(self) -> None:
        """
        An older approval put in the store at a newer place than it signs
        counts for nothing.
        """
        approval = self.sign("approved", 1)
        self.apply(approval)
        self.apply(self.sign("revoked", 2))
        self.successResultOf(
            self.store.record(
                self.billing, KeyState.approved, "", "x", approval.encode(), 7
            )
        )
        logged = events(self, "dwtrust.forged_decision")
        self.assertIs(self.refusal().code, ErrorCode.revoked)
        self.assertIn("filed at 7", logged[0]["error"])

    def test_olderDecisionOverTheChannel(self) -> None:
        """
        An owner re-sending another owner's older approval is refused, and
        the key stays revoked.
        """
        approval = self.sign("approved", 1)
        self.apply(approval)
        self.apply(self.sign("revoked", 2))
        logged = events(self, "dwtrust.rollback")
        message = self.rejected(approval, self.bob)
        self.assertIn("not newer", message)
        self.assertEqual(logged[0]["sender"], self.bob.fingerprint)
        self.assertEqual(logged[0]["signer"], self.alice.fingerprint)
        self.assertEqual(self.lookup().sequence, 2)
        self.assertIs(self.refusal().code, ErrorCode.revoked)

    def test_olderDecisionFromTheFleet(self) -> None:
        """
        Another instance's older decision, announced through the shared
        store, is refused as a rollback and wakes nobody.
        """
        approval = self.sign("approved", 1)
        self.apply(approval)
        self.apply(self.sign("revoked", 2))
        waiting = self.bus.waitFor(self.billing.fingerprint)
        old = evolve(
            self.lookup(),
            state=KeyState.approved,
            decision=approval.encode(),
            sequence=1,
        )
        logged = events(self, "dwtrust.rollback")
        self.successResultOf(
            self.decisions.fromFleet(
                StoreChange("decided", self.billing.fingerprint, old, False)
            )
        )
        self.assertNoResult(waiting)
        self.assertEqual(len(logged), 1)
        waiting.addErrback(lambda f: f.trap(CancelledError))
        waiting.cancel()

    def test_newerDecisionFromTheFleet(self) -> None:
        """
        Another instance's newer revocation is put in force here: the key's
        sessions close and waiters wake.
        """
        self.apply(self.sign("approved", 1))
        session = Session()
        self.sessions[self.billing.fingerprint] = [session]
        revocation = self.sign("revoked", 2)
        newer = evolve(
            self.lookup(),
            state=KeyState.revoked,
            decision=revocation.encode(),
            sequence=2,
        )
        self.successResultOf(
            self.decisions.fromFleet(
                StoreChange("decided", self.billing.fingerprint, newer, False)
            )
        )
        self.assertTrue(session.aborted)
        self.assertEqual(
            self.successResultOf(self.newest.get(self.billing.fingerprint)),
            revocation,
        )


class RevocationTests(DecisionsTestCase):
    """
    A revocation always takes effect.
    """

    def test_inForceWhenTheStoreFails(self) -> None:
        """
        A revocation the store cannot take closes the key's sessions and
        refuses the key all the same; it says it is not stored, and it is
        stored once the store works again.
        """
        self.apply(self.sign("approved", 1))
        session = Session()
        self.sessions[self.billing.fingerprint] = [session]
        self.store.failing = True
        applied = self.apply(self.sign("revoked", 2))
        self.assertFalse(applied.stored)
        self.assertIn("disk is full", applied.storeError)
        self.assertTrue(session.aborted)
        self.assertIs(self.refusal().code, ErrorCode.revoked)
        self.assertEqual(self.lookup().state, KeyState.approved)
        self.clock.advance(1)
        self.assertEqual(self.lookup().state, KeyState.approved)
        self.store.failing = False
        logged = events(self, "dwtrust.decision_stored")
        self.clock.advance(2)
        self.assertEqual(self.lookup().state, KeyState.revoked)
        self.assertEqual(len(logged), 1)
        self.assertIs(self.refusal().code, ErrorCode.revoked)

    def test_approvalNotAppliedWhenTheStoreFails(self) -> None:
        """
        An approval the store cannot take is not applied: the key stays as
        it was, and nobody waiting is woken.
        """
        waiting = self.bus.waitFor(self.billing.fingerprint)
        self.store.failing = True
        failure = self.failureResultOf(
            Deferred.fromCoroutine(
                self.decisions.apply(
                    self.sign("approved", 1).encode(), peerOf(self.alice)
                )
            )
        )
        self.assertIn("disk is full", failure.getErrorMessage())
        self.assertNoResult(waiting)
        self.assertIsNone(
            self.successResultOf(self.newest.get(self.billing.fingerprint))
        )
        waiting.addErrback(lambda f: f.trap(CancelledError))
        waiting.cancel()


class IdentityTests(DecisionsTestCase):
    """
    A decision is about a key and the names it proved.
    """

    def test_wokenByADecisionAboutAnotherName(self) -> None:
        """
        A connection held while the owners decide, whose key the owners then
        approve under another name, is refused with C{identity_changed}.
        """
        owners = OwnersApprover(self.store, self.bus, now=self.clock.seconds)
        policy = ApprovalPolicy(
            self.store, owners, self.service, bus=self.bus, decisions=self.decisions
        )
        held = policy.check(self.billing, "10.1.1.1:1")
        self.assertNoResult(held)
        # The owners approve the key as acme/admin (as a request raised
        # under that name would have shown it).
        admin = PeerIdentity("acme", "admin", self.billing.publicKey)
        decision = sign(self.alice, self.service, admin, "approved", NOW, "", 1)
        self.decisions._applied(decision)
        refusal = self.failureResultOf(held, Refusal).value
        assert isinstance(refusal, Refusal)
        self.assertIs(refusal.code, ErrorCode.identity_changed)

    def test_pendingKeySwitchingNames(self) -> None:
        """
        A key pending as acme/billing that connects again claiming acme/admin
        is refused with C{identity_changed}; the owners are told, and the
        request they see is unchanged.
        """
        owners = OwnersApprover(self.store, self.bus, now=self.clock.seconds)
        policy = ApprovalPolicy(
            self.store, owners, self.service, bus=self.bus, decisions=self.decisions
        )
        held = policy.check(self.billing, "10.1.1.1:1")
        self.assertNoResult(held)
        before = self.lookup()
        admin = PeerIdentity("acme", "admin", self.billing.publicKey)
        refusal = self.failureResultOf(policy.check(admin, "10.1.1.1:2"), Refusal)
        assert isinstance(refusal.value, Refusal)
        self.assertIs(refusal.value.code, ErrorCode.identity_changed)
        [changed] = [m for m in self.messages if m.kind == "identity_changed"]
        self.assertEqual(
            (changed.peerService, changed.knownAs), ("admin", "acme/billing")
        )
        after = self.lookup()
        self.assertEqual((after.org, after.service), ("acme", "billing"))
        self.assertEqual(after.requestId, before.requestId)
        held.cancel()
        self.failureResultOf(held)


class CarryOverTests(DecisionsTestCase):
    """
    Decisions stored before version 2 are carried over.
    """

    def old(self, state: str) -> SignedDecision:
        new = self.sign(state, 1)
        unsigned = evolve(new, serviceKey="", sequence=0, signature=b"")
        return evolve(unsigned, signature=self.alice.sign(unsigned.payload()))

    def test_carriedOver(self) -> None:
        """
        A version 1 approval in the store counts until it is carried over;
        then it is re-signed by the service as decision 1, and a version 1
        approval no longer counts on its own.
        """
        old = self.old("approved")
        self.assertEqual(old.version, 1)
        self.successResultOf(
            self.store.record(
                self.billing, KeyState.approved, "s", "alice", old.encode(), 0
            )
        )
        self.assertIsNone(
            self.successResultOf(self.policy.check(self.billing, "10.1.1.1:1"))
        )
        carried = self.successResultOf(
            Deferred.fromCoroutine(self.decisions.carryOver())
        )
        self.assertEqual(carried, 1)
        record = self.lookup()
        new = SignedDecision.decode(record.decision)
        self.assertEqual(
            (new.version, new.sequence, new.signer, new.state),
            (2, 1, self.service.fingerprint, "approved"),
        )
        self.assertTrue(self.newest.carriedOver)
        self.assertIsNone(
            self.successResultOf(self.policy.check(self.billing, "10.1.1.1:1"))
        )
        # A version 1 approval of another key, planted after the carry-over,
        # counts for nothing.
        other = peerOf(makeIdentity("acme", "payroll"))
        planted = sign(self.alice, self.service, other, "approved", NOW, "", 1)
        planted = evolve(planted, serviceKey="", sequence=0, signature=b"")
        planted = evolve(planted, signature=self.alice.sign(planted.payload()))
        self.successResultOf(
            self.store.record(other, KeyState.approved, "s", "x", planted.encode(), 0)
        )
        self.assertNoResult(self.policy.check(other, "10.1.1.1:1"))

    def test_version1RefusalStillCounts(self) -> None:
        """
        A version 1 revocation counts after the carry-over too.
        """
        self.successResultOf(Deferred.fromCoroutine(self.decisions.carryOver()))
        self.successResultOf(
            self.store.record(
                self.billing,
                KeyState.revoked,
                "s",
                "alice",
                self.old("revoked").encode(),
                0,
            )
        )
        self.assertIs(self.refusal().code, ErrorCode.revoked)


class NewestDecisionsFileTests(TestCase):
    """
    The instance's own file of the newest decisions.
    """

    def test_survivesARestart(self) -> Deferred[None]:
        """
        What is remembered is in the file (0600) after the memory is gone,
        and an older decision never replaces it there.
        """
        path = temporaryDirectory(self).child("newest-decisions.sqlite3")
        service = makeIdentity("acme", "ledger")
        alice = makeIdentity("acme", "alice")
        billing = peerOf(makeIdentity("acme", "billing"))
        revoked = sign(alice, service, billing, "revoked", NOW, "", 2)
        approved = sign(alice, service, billing, "approved", NOW, "", 1)

        async def run() -> None:
            newest = await NewestDecisions.open(path)
            await newest.remember(revoked)
            await newest.markCarriedOver()
            await newest.close()
            self.assertEqual(path.getPermissions().shorthand(), "rw-------")
            again = await NewestDecisions.open(path)
            self.assertTrue(again.carriedOver)
            # Remembering an older one, as a process that never read the
            # newer one would, changes nothing in the file.
            await again.remember(approved)
            await again.close()
            third = await NewestDecisions.open(path)
            self.assertEqual(await third.get(billing.fingerprint), revoked)
            await third.close()

        return Deferred.fromCoroutine(run())
