"""
The server's path for a known key, which every connection of an approved
client takes: L{ApprovalPolicy.check} answers at once (callbacks on
Deferreds that have already fired, no coroutine) when the store answers
from memory, and a stored decision that counted is not decoded again, but
counts only as long as its signer is trusted.  Two first connections of
one key decided at once both go on with the decision stored first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import ErrorCode, Refusal
from dwtrust._authority import Decisions
from dwtrust._decision import Signers
from dwtrust._policy import ApprovalPolicy
from dwtrust.approval import approverFromName
from dwtrust.store import KeyRecord, KeyState
from dwtrust.store._newest import NewestDecisions
from dwtrust.testing import MemoryTrustStore

from .helpers import makeIdentity
from .test_authority import DecisionsTestCase, events, peerOf


class KnownKeyTests(DecisionsTestCase):
    def decided(self, state: str, signer: object = None) -> None:
        decision = self.sign(state, 1, signer)
        self.successResultOf(
            self.store.record(
                self.billing,
                KeyState(state),
                "s",
                "alice",
                decision.encode(),
                1,
                "owner",
            )
        )

    def test_approvedAtOnce(self) -> None:
        """
        An approved key's check has succeeded by the time C{check} returns,
        every time.
        """
        self.decided("approved")
        for _ in range(3):
            self.assertIsNone(
                self.successResultOf(self.policy.check(self.billing, "10.1.1.1:1"))
            )

    def test_revokedAtOnce(self) -> None:
        """
        A revoked key's check has failed with C{revoked} by the time
        C{check} returns.
        """
        self.decided("revoked")
        for _ in range(2):
            self.assertIs(self.refusal().code, ErrorCode.revoked)

    def test_otherNamesAtOnce(self) -> None:
        """
        A known key claiming other names is refused with
        C{identity_changed}, from memory as from the store.
        """
        self.decided("approved")
        self.successResultOf(self.policy.check(self.billing, "10.1.1.1:1"))
        other = type(self.billing)("acme", "payroll", self.billing.publicKey)
        failure = self.failureResultOf(self.policy.check(other, "10.1.1.1:1"), Refusal)
        self.assertIs(failure.value.code, ErrorCode.identity_changed)

    def test_countsOnlyWhileItsSignerIsTrusted(self) -> None:
        """
        A stored decision that counted (and is remembered as counting) counts
        no more once its signer is no longer trusted (an owner removed on a
        reload): it is reported as forged; trusted again, it counts again.
        """
        forged = events(self, "dwtrust.forged_decision")
        self.decided("approved")
        record = self.lookup()
        self.assertIsNotNone(self.decisions.verify(record))
        self.assertIsNotNone(self.decisions.verify(record))
        self.decisions.signers.discard(self.alice.fingerprint)
        self.assertIsNone(self.decisions.verify(record))
        self.assertEqual(len(forged), 1)
        self.decisions.signers.add(self.alice.publicKey)
        self.assertIsNotNone(self.decisions.verify(record))


class HeldStore(MemoryTrustStore):
    """
    A store whose decision writes wait until the test releases them, as
    two connections' writes to a real store overlap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[KeyRecord], tuple[Any, ...]]] = []

    def record(self, *args: Any, **kwargs: Any) -> Deferred[KeyRecord]:
        writing: Deferred[KeyRecord] = Deferred()
        self.held.append((writing, (args, kwargs)))
        return writing

    def release(self) -> None:
        held, self.held = self.held, []
        for writing, (args, kwargs) in held:
            MemoryTrustStore.record(self, *args, **kwargs).chainDeferred(writing)


class SimultaneousFirstContactTests(SynchronousTestCase):
    def test_bothConnectionsGoOn(self) -> None:
        """
        Two connections with the same new key, which an approver approves
        for both at once: the first decision stored stands, and the other
        connection, whose write the store refused as a conflict, goes on
        with that decision rather than failing.
        """
        clock = Clock()
        service = makeIdentity("acme", "ledger")
        store = HeldStore()
        policy = ApprovalPolicy(
            store,
            approverFromName("auto"),
            service,
            decisions=Decisions(
                service, store, Signers(), NewestDecisions.inMemory(), clock=clock
            ),
        )
        peer = peerOf(makeIdentity("acme", "billing"))
        first = policy.check(peer, "10.1.1.1:1")
        second = policy.check(peer, "10.1.1.1:2")
        self.assertEqual(len(store.held), 2)
        store.release()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        record = self.successResultOf(store.lookup(peer.fingerprint))
        assert record is not None
        self.assertEqual((record.state, record.sequence), (KeyState.approved, 1))
