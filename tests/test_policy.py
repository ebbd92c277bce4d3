"""
Tests for L{dwtrust._policy}: the server's L{ApprovalPolicy} and the client's
L{PinningPolicy}, over the in-memory fakes of L{dwtrust.testing}.
"""

from __future__ import annotations

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import (
    ApprovalPolicy,
    ErrorCode,
    Identity,
    PeerIdentity,
    PinningPolicy,
    Refusal,
)
from dwtrust._decision import Signers
from dwtrust.approval import (
    ApprovalRequest,
    AutoApprover,
    Decision,
    KnownOnlyApprover,
    approverFromName,
)
from dwtrust.store import KeyRecord, KeyState
from dwtrust.testing import FakeApprover, MemoryTrustStore, recordDecision

SERVICE = "acme/ledger"


def makeServiceIdentity() -> Identity:
    """
    The identity of the service whose policy is under test, C{SERVICE}.
    """
    return Identity.generate("acme", "ledger")


SOURCE = "10.1.2.3:40000"
ADDRESS = "ledger.example:8443"


def peerIdentity(org: str = "acme", service: str = "billing") -> PeerIdentity:
    """
    A peer with a fresh Ed25519 key.
    """
    identity = Identity.generate(org, service)
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


def observe(case: SynchronousTestCase) -> EventLoggingObserver:
    """
    Record every log event until C{case} ends.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


class FakeNow:
    def __init__(self, when: float = 500.0) -> None:
        self.when = when

    def __call__(self) -> float:
        return self.when


class ApprovalPolicyTests(SynchronousTestCase):
    """
    L{ApprovalPolicy}: known keys from the store, unknown ones to the
    approver.
    """

    def setUp(self) -> None:
        self.now = FakeNow()
        self.store = MemoryTrustStore(self.now)
        self.approver = FakeApprover()
        self.service = makeServiceIdentity()
        self.policy = ApprovalPolicy(self.store, self.approver, self.service)
        self.peer = peerIdentity()

    def known(self, state: KeyState, peer: PeerIdentity | None = None) -> KeyRecord:
        """
        Put a record for C{peer} (by default C{self.peer}) in the store.
        """
        recorded = recordDecision(
            self.store,
            self.service,
            self.service,
            peer or self.peer,
            state,
            "10.9.9.9:1",
        )
        return self.successResultOf(recorded)

    def refusal(self, checking: Deferred[None]) -> Refusal:
        failure = self.failureResultOf(checking, Refusal)
        refusal = failure.value
        assert isinstance(refusal, Refusal)
        return refusal

    def test_approvedPassesWithoutAsking(self) -> None:
        """
        A key the store approves passes at once; the approver is not asked,
        and the attempt is counted.
        """
        self.known(KeyState.approved)
        self.now.when = 600.0
        self.assertIsNone(self.successResultOf(self.policy.check(self.peer, SOURCE)))
        self.assertEqual(self.approver.requests, [])
        record = self.store.peers[self.peer.fingerprint]
        self.assertEqual(
            (record.state, record.attempts, record.lastSeen, record.source),
            (KeyState.approved, 2, 600.0, SOURCE),
        )

    def assertRefusedAs(self, state: KeyState, code: ErrorCode) -> None:
        """
        A key recorded in C{state} is refused with C{code}, without asking the
        approver and without changing its state.
        """
        self.known(state)
        refusal = self.refusal(self.policy.check(self.peer, SOURCE))
        self.assertIs(refusal.code, code)
        self.assertIn(state.value, refusal.message)
        self.assertEqual(self.approver.requests, [])
        self.assertIs(self.store.peers[self.peer.fingerprint].state, state)

    def test_denied(self) -> None:
        """
        A denied key is refused with C{denied}.
        """
        self.assertRefusedAs(KeyState.denied, ErrorCode.denied)

    def test_revoked(self) -> None:
        """
        A revoked key is refused with C{revoked}, and never goes back to the
        approver.
        """
        self.assertRefusedAs(KeyState.revoked, ErrorCode.revoked)

    def test_blocked(self) -> None:
        """
        A blocked key is refused with C{denied}.
        """
        self.assertRefusedAs(KeyState.blocked, ErrorCode.denied)

    def test_pending(self) -> None:
        """
        A key whose request is pending goes back to the approver, which holds
        it until the owners decide (L{OwnersApprover} joins the request
        already pending rather than making another).
        """
        self.successResultOf(
            self.store.addPending(self.peer, "10.9.9.9:1", "abc", 1e12, 10, 10)
        )
        checking = self.policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        [pending] = self.approver.requests
        self.assertEqual(pending.request.peer, self.peer)
        pending.approve()
        self.assertIsNone(self.successResultOf(checking))
        self.assertIs(self.store.peers[self.peer.fingerprint].state, KeyState.approved)

    def test_unsignedApprovalIsUnknown(self) -> None:
        """
        A row set to C{approved} without a valid signature (written straight
        into the store) is not trusted: the key goes to the approver as an
        unknown one, and the forgery is logged.
        """
        self.successResultOf(
            self.store.record(self.peer, KeyState.approved, "10.9.9.9:1", "forger")
        )
        checking = self.policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        [pending] = self.approver.requests
        pending.deny()
        self.assertEqual(self.refusal(checking).code, ErrorCode.denied)

    def test_approvalSignedByAStrangerIsUnknown(self) -> None:
        """
        An approval signed by a key that is neither the service's nor a
        registered owner's counts for nothing.
        """
        stranger = Identity.generate("evil", "mallory")
        self.successResultOf(
            recordDecision(
                self.store, stranger, self.service, self.peer, KeyState.approved
            )
        )
        checking = self.policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        self.assertEqual(len(self.approver.requests), 1)

    def test_approvalForAnotherServiceIsUnknown(self) -> None:
        """
        An approval signed by the service's own key, but for another service,
        counts for nothing here.
        """
        other = Identity.generate("acme", "other")
        self.successResultOf(
            recordDecision(
                self.store, self.service, other, self.peer, KeyState.approved
            )
        )
        checking = self.policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        self.assertEqual(len(self.approver.requests), 1)

    def test_approvalForAnotherServiceOfTheSameNameIsUnknown(self) -> None:
        """
        An approval signed by a registered owner for another service that
        has the same name, but its own key, counts for nothing here: a
        decision is bound to the service's key, not only its name.
        """
        owner = Identity.generate("acme", "alice")
        policy = ApprovalPolicy(
            self.store, self.approver, self.service, Signers([owner.publicKey])
        )
        twin = Identity.generate("acme", "ledger")
        self.assertEqual(twin.name, self.service.name)
        self.successResultOf(
            recordDecision(self.store, owner, twin, self.peer, KeyState.approved)
        )
        events = observe(self)
        checking = policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        self.assertEqual(len(self.approver.requests), 1)
        [forged] = [e for e in events if e.get("event") == "dwtrust.forged_decision"]
        self.assertIn(twin.fingerprint, forged["error"])

    def test_approvedKeyClaimingAnotherNameRefused(self) -> None:
        """
        A key approved as acme/billing that proves the name acme/admin is
        refused with C{identity_changed}, even when acme/admin has an approved
        key of its own: the approver is not asked, nothing is stored, and the
        owners are told, with both names.
        """
        self.known(KeyState.approved)
        admin = peerIdentity("acme", "admin")
        self.known(KeyState.approved, admin)
        before = (dict(self.store.peers), dict(self.store.history))
        events = observe(self)
        impostor = PeerIdentity("acme", "admin", self.peer.publicKey)
        refusal = self.refusal(self.policy.check(impostor, SOURCE))
        self.assertIs(refusal.code, ErrorCode.identity_changed)
        self.assertIn("acme/billing", refusal.message)
        self.assertEqual(self.approver.requests, [])
        self.assertEqual((dict(self.store.peers), dict(self.store.history)), before)
        [changed] = [e for e in events if e.get("event") == "dwtrust.identity_changed"]
        self.assertEqual(
            (changed["peer_name"], changed["known_as"]), ("acme/admin", "acme/billing")
        )

    def test_refusedKeyClaimingAnotherNameStillRefused(self) -> None:
        """
        A revoked key claiming another name is refused too (with
        C{identity_changed}: the names are checked first).
        """
        self.known(KeyState.revoked)
        impostor = PeerIdentity("acme", "admin", self.peer.publicKey)
        refusal = self.refusal(self.policy.check(impostor, SOURCE))
        self.assertIs(refusal.code, ErrorCode.identity_changed)

    def test_decisionOfAnotherKeyIsUnknown(self) -> None:
        """
        A valid approval of one key, copied into another key's row, does not
        approve that other key.
        """
        other = peerIdentity("acme", "other")
        good = self.known(KeyState.approved, other)
        self.store.peers[self.peer.fingerprint] = evolve(
            good,
            fingerprint=self.peer.fingerprint,
            publicKey=self.peer.publicKey.blob,
        )
        checking = self.policy.check(self.peer, "10.9.9.9:1")
        self.assertNoResult(checking)
        self.assertEqual(len(self.approver.requests), 1)

    def test_identityChanged(self) -> None:
        """
        A new key for an organization and service whose other key is approved
        is refused with C{identity_changed}: the approver is not asked, and
        nothing is stored about the new key.
        """
        old = self.known(KeyState.approved, peerIdentity())
        before = dict(self.store.peers)
        refusal = self.refusal(self.policy.check(self.peer, SOURCE))
        self.assertIs(refusal.code, ErrorCode.identity_changed)
        self.assertIn("acme/billing", refusal.message)
        self.assertEqual(self.approver.requests, [])
        self.assertEqual(self.store.peers, before)
        self.assertEqual(list(self.store.peers), [old.fingerprint])

    def test_identityChangedLogged(self) -> None:
        """
        An identity change is a warning event with both fingerprints.
        """
        events = observe(self)
        old = self.known(KeyState.approved, peerIdentity())
        self.refusal(self.policy.check(self.peer, SOURCE))
        changed = [e for e in events if e.get("event") == "dwtrust.identity_changed"]
        self.assertEqual(len(changed), 1)
        self.assertEqual(changed[0]["log_level"], LogLevel.warn)
        self.assertEqual(changed[0]["fingerprint"], self.peer.fingerprint)
        self.assertEqual(changed[0]["known"], old.fingerprint)
        self.assertEqual(changed[0]["source"], SOURCE)

    def test_otherServiceKeyDoesNotCount(self) -> None:
        """
        An approved key of another service of the same organization is no
        reason to refuse: the unknown key goes to the approver.
        """
        self.known(KeyState.approved, peerIdentity("acme", "payroll"))
        self.policy.check(self.peer, SOURCE)
        self.assertEqual(len(self.approver.requests), 1)

    def test_unknownAsksApprover(self) -> None:
        """
        An unknown key goes to the approver with the peer, where it connects
        from and the service it wants; the check waits for the decision.
        """
        checking = self.policy.check(self.peer, SOURCE)
        self.assertNoResult(checking)
        [pending] = self.approver.requests
        self.assertEqual(pending.request, ApprovalRequest(self.peer, SOURCE, SERVICE))
        self.assertEqual(self.store.peers, {})

    def test_approvalRecorded(self) -> None:
        """
        An approval lets the waiting check pass, and records the key as
        approved, with who decided and where it connected from.
        """
        checking = self.policy.check(self.peer, SOURCE)
        self.now.when = 700.0
        self.approver.requests[0].deferred.callback(
            Decision(True, "looks right", "owner:alice")
        )
        self.assertIsNone(self.successResultOf(checking))
        record = self.store.peers[self.peer.fingerprint]
        self.assertEqual(
            (record.state, record.decidedBy, record.source, record.firstSeen),
            (KeyState.approved, "owner:alice", SOURCE, 700.0),
        )

    def test_denialRecorded(self) -> None:
        """
        A denial refuses the waiting check with C{denied} and the approver's
        reason, and records the key as denied.
        """
        checking = self.policy.check(self.peer, SOURCE)
        self.approver.requests[0].deferred.callback(
            Decision(False, "not ours", "owner:bob")
        )
        refusal = self.refusal(checking)
        self.assertIs(refusal.code, ErrorCode.denied)
        self.assertEqual(refusal.message, "not ours")
        record = self.store.peers[self.peer.fingerprint]
        self.assertEqual(
            (record.state, record.decidedBy), (KeyState.denied, "owner:bob")
        )

    def test_decisionLogged(self) -> None:
        """
        Every decision is an info event naming the peer, the decider and the
        reason.
        """
        events = observe(self)
        self.policy.check(self.peer, SOURCE)
        self.approver.requests[0].deferred.callback(
            Decision(True, "looks right", "owner:alice")
        )
        [event] = [e for e in events if e.get("event") == "dwtrust.decision"]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(
            (event["decided"], event["decided_by"], event["reason"]),
            ("approved", "owner:alice", "looks right"),
        )
        self.assertEqual(event["fingerprint"], self.peer.fingerprint)

    def test_approvalNotRemembered(self) -> None:
        """
        An approval with C{remember=False} lets this connection pass and
        stores nothing, so the next one is asked about again.
        """
        checking = self.policy.check(self.peer, SOURCE)
        self.approver.requests[0].deferred.callback(
            Decision(True, "just this once", "owner:alice", remember=False)
        )
        self.assertIsNone(self.successResultOf(checking))
        self.assertEqual(self.store.peers, {})
        self.assertNoResult(self.policy.check(self.peer, SOURCE))
        self.assertEqual(len(self.approver.requests), 2)

    def test_denialNotRemembered(self) -> None:
        """
        A denial with C{remember=False} refuses and stores nothing.
        """
        checking = self.policy.check(self.peer, SOURCE)
        self.approver.requests[0].deferred.callback(
            Decision(False, "not now", "policy", remember=False)
        )
        self.assertIs(self.refusal(checking).code, ErrorCode.denied)
        self.assertEqual(self.store.peers, {})

    def test_cancelWhileWaiting(self) -> None:
        """
        Cancelling a check that waits for the approver cancels the request,
        and stores nothing.
        """
        checking = self.policy.check(self.peer, SOURCE)
        checking.cancel()
        self.failureResultOf(checking, CancelledError)
        self.assertTrue(self.approver.requests[0].cancelled)
        self.assertEqual(self.store.peers, {})

    def test_knownOnlyRefuses(self) -> None:
        """
        With L{KnownOnlyApprover}, an unknown key is refused with C{denied},
        and nothing is stored about it.
        """
        policy = ApprovalPolicy(self.store, KnownOnlyApprover(), self.service)
        refusal = self.refusal(policy.check(self.peer, SOURCE))
        self.assertIs(refusal.code, ErrorCode.denied)
        self.assertIn("unknown key", refusal.message)
        self.assertEqual(self.store.peers, {})

    def test_knownOnlyAdmitsKnown(self) -> None:
        """
        With L{KnownOnlyApprover}, an approved key still passes.
        """
        self.known(KeyState.approved)
        policy = ApprovalPolicy(self.store, KnownOnlyApprover(), self.service)
        self.assertIsNone(self.successResultOf(policy.check(self.peer, SOURCE)))

    def test_autoApproves(self) -> None:
        """
        With L{AutoApprover}, an unknown key is approved and recorded as
        decided by C{auto}; the approver warns when it is made and again for
        each key, naming the key.
        """
        events = observe(self)
        approver = AutoApprover()
        created = [e for e in events if e.get("event") == "dwtrust.approver.auto"]
        self.assertEqual(len(created), 1)
        self.assertEqual(created[0]["log_level"], LogLevel.warn)

        policy = ApprovalPolicy(self.store, approver, self.service)
        self.assertIsNone(self.successResultOf(policy.check(self.peer, SOURCE)))
        record = self.store.peers[self.peer.fingerprint]
        self.assertEqual((record.state, record.decidedBy), (KeyState.approved, "auto"))

        warnings = [
            e
            for e in events
            if e.get("event") == "dwtrust.approver.auto"
            and e.get("fingerprint") == self.peer.fingerprint
        ]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["log_level"], LogLevel.warn)
        self.assertEqual(warnings[0]["source"], SOURCE)

    def test_approverFromName(self) -> None:
        """
        The built-in approvers are found by their command-line names; another
        name is a L{ValueError} that lists them.
        """
        self.assertIsInstance(approverFromName("known-only"), KnownOnlyApprover)
        self.assertIsInstance(approverFromName("auto"), AutoApprover)
        error = self.assertRaises(ValueError, approverFromName, "yes-please")
        self.assertIn("'yes-please'", str(error))
        self.assertIn("auto, known-only", str(error))


class PinningPolicyTests(SynchronousTestCase):
    """
    L{PinningPolicy}: the first key at an address is pinned, a changed one
    refused.
    """

    def setUp(self) -> None:
        self.now = FakeNow()
        self.store = MemoryTrustStore(self.now)
        self.server = peerIdentity("acme", "ledger")

    def refusal(self, checking: Deferred[None]) -> Refusal:
        failure = self.failureResultOf(checking, Refusal)
        refusal = failure.value
        assert isinstance(refusal, Refusal)
        return refusal

    def pinOf(self, peer: PeerIdentity, address: str = ADDRESS) -> None:
        self.successResultOf(self.store.pin(address, peer))

    def test_firstContactPins(self) -> None:
        """
        The first server seen at an address passes, and its key is pinned.
        """
        self.assertIsNone(
            self.successResultOf(PinningPolicy(self.store).check(self.server, ADDRESS))
        )
        pin = self.store.pins[ADDRESS]
        self.assertEqual(
            (pin.org, pin.service, pin.fingerprint, pin.publicKey, pin.firstSeen),
            (
                "acme",
                "ledger",
                self.server.fingerprint,
                self.server.publicKey.blob,
                500.0,
            ),
        )

    def test_sameKeyPasses(self) -> None:
        """
        The pinned key at its address passes, and the pin stays as it was.
        """
        self.pinOf(self.server)
        before = dict(self.store.pins)
        self.now.when = 900.0
        self.assertIsNone(
            self.successResultOf(PinningPolicy(self.store).check(self.server, ADDRESS))
        )
        self.assertEqual(self.store.pins, before)

    def test_differentKeySameAddress(self) -> None:
        """
        Another key at a pinned address is refused with C{identity_changed},
        and the pin is not replaced.
        """
        self.pinOf(self.server)
        before = dict(self.store.pins)
        impostor = peerIdentity("acme", "ledger")
        refusal = self.refusal(PinningPolicy(self.store).check(impostor, ADDRESS))
        self.assertIs(refusal.code, ErrorCode.identity_changed)
        self.assertIn(self.server.fingerprint, refusal.message)
        self.assertEqual(self.store.pins, before)

    def test_sameKeyOtherNameSameAddress(self) -> None:
        """
        The pinned key claiming another name at its address is refused with
        C{identity_changed} too.
        """
        self.pinOf(self.server)
        renamed = PeerIdentity("acme", "payroll", self.server.publicKey)
        refusal = self.refusal(PinningPolicy(self.store).check(renamed, ADDRESS))
        self.assertIs(refusal.code, ErrorCode.identity_changed)

    def test_differentKeyForServicePinnedElsewhere(self) -> None:
        """
        A new address whose server claims an organization and service pinned
        at another address with another key is refused with
        C{identity_changed}, and nothing is pinned for the new address.
        """
        self.pinOf(self.server, "old.example:8443")
        impostor = peerIdentity("acme", "ledger")
        refusal = self.refusal(
            PinningPolicy(self.store).check(impostor, "new.example:8443")
        )
        self.assertIs(refusal.code, ErrorCode.identity_changed)
        self.assertIn("old.example:8443", refusal.message)
        self.assertEqual(list(self.store.pins), ["old.example:8443"])

    def test_sameKeyAtNewAddressPinned(self) -> None:
        """
        The same service with its pinned key at a new address passes, and is
        pinned there too.
        """
        self.pinOf(self.server, "old.example:8443")
        self.successResultOf(
            PinningPolicy(self.store).check(self.server, "new.example:8443")
        )
        self.assertEqual(
            self.store.pins["new.example:8443"].fingerprint, self.server.fingerprint
        )

    def test_strictRefusesUnknown(self) -> None:
        """
        With C{strict}, a server with no pin is refused with C{denied}, and
        nothing is pinned.
        """
        refusal = self.refusal(
            PinningPolicy(self.store, strict=True).check(self.server, ADDRESS)
        )
        self.assertIs(refusal.code, ErrorCode.denied)
        self.assertIn("strict", refusal.message)
        self.assertEqual(self.store.pins, {})

    def test_strictAdmitsPinned(self) -> None:
        """
        With C{strict}, a pinned server still passes.
        """
        self.pinOf(self.server)
        self.assertIsNone(
            self.successResultOf(
                PinningPolicy(self.store, strict=True).check(self.server, ADDRESS)
            )
        )

    def test_expectedMismatch(self) -> None:
        """
        A server that is not the C{expected} one is refused with C{denied}
        naming both, and nothing is pinned.
        """
        policy = PinningPolicy(self.store, expected="acme/billing")
        refusal = self.refusal(policy.check(self.server, ADDRESS))
        self.assertIs(refusal.code, ErrorCode.denied)
        self.assertIn("acme/billing", refusal.message)
        self.assertIn("acme/ledger", refusal.message)
        self.assertEqual(self.store.pins, {})

    def test_expectedMatch(self) -> None:
        """
        The C{expected} server passes and is pinned.
        """
        policy = PinningPolicy(self.store, expected="acme/ledger")
        self.assertIsNone(self.successResultOf(policy.check(self.server, ADDRESS)))
        self.assertIn(ADDRESS, self.store.pins)

    def test_pinLogged(self) -> None:
        """
        Pinning is an info event; an identity change a warning.
        """
        events = observe(self)
        policy = PinningPolicy(self.store)
        self.successResultOf(policy.check(self.server, ADDRESS))
        self.refusal(policy.check(peerIdentity("acme", "ledger"), ADDRESS))
        levels = {
            e["event"]: e["log_level"]
            for e in events
            if e.get("event") in ("dwtrust.pinned", "dwtrust.identity_changed")
        }
        self.assertEqual(
            levels,
            {
                "dwtrust.pinned": LogLevel.info,
                "dwtrust.identity_changed": LogLevel.warn,
            },
        )


class SignersNotSharedTests(SynchronousTestCase):
    """
    L{ApprovalPolicy} trusts the service's own key, without adding it to the
    L{Signers} its caller gave (and may share with the control channel).
    """

    def test_ownKeyNotAddedToCallersSigners(self) -> None:
        owners = Signers()
        service = makeServiceIdentity()
        policy = ApprovalPolicy(MemoryTrustStore(), FakeApprover(), service, owners)
        self.assertNotIn(service.fingerprint, owners)
        self.assertIn(service.fingerprint, policy.decisions.signers)
