"""
Tests for L{dwtrust.approval}'s built-in approvers and their composition, the
webhook against a real HTTP server on loopback, Python approval callbacks,
and L{dwtrust.testing}'s helpers for testing one's own.

L{Catalogue} and L{AcmePolicy} are a user's own asynchronous policy, tested
in memory; the worked example of C{docs/approval.rst} is tested in
C{tests/test_approval_example.py}.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dwtrust import (
    ApprovalPolicy,
    ErrorCode,
    Identity,
    PeerIdentity,
    PublicKey,
    Refusal,
)
from dwtrust.approval import (
    APPROVER_SPECS,
    BUILTIN_APPROVERS,
    ApprovalRequest,
    AutoApprover,
    CallableApprover,
    ChainApprover,
    Decision,
    DenyApprover,
    IApprover,
    KnownOnlyApprover,
    PythonApprover,
    WebhookApprover,
    approvalMessage,
    approverFromName,
    approverFromSpec,
    approverFromSpecs,
    checkApproverSpecs,
)
from dwtrust.approval._webhook import MAX_RESPONSE_BYTES, redactURL
from dwtrust.store import KeyState
from dwtrust.testing import (
    FakeApprover,
    MemoryTrustStore,
    NotDecided,
    approvalRequest,
    connectInMemory,
    decide,
    memoryAuthenticator,
)

LOOPBACK = "127.0.0.1"


def observe(case: SynchronousTestCase) -> EventLoggingObserver:
    """
    Record every log event until C{case} ends.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def eventsOf(observer: EventLoggingObserver, event: str) -> list[dict[str, Any]]:
    return [e for e in observer if e.get("event") == event]


# --- A user's own asynchronous policy -----------------------------------------


class Catalogue:
    """
    acme's catalogue of the keys it handed out, each with the C{org/service}
    it was issued for.  A lookup takes a while, as a call to a real
    catalogue's HTTP API would.
    """

    def __init__(self, clock: IReactorTime, keys: dict[str, str]) -> None:
        self.clock = clock
        self.keys = dict(keys)

    def lookup(self, fingerprint: str) -> Deferred[str | None]:
        return deferLater(self.clock, 0.5, lambda: self.keys.get(fingerprint))


class AcmePolicy:
    """
    acme's approval policy, which decides on keys (names are only claims):
    a key the catalogue lists is approved if it proved the name it was issued
    for, and refused otherwise; a banned key is refused outright; about other
    keys it has no opinion, so the next approver (the owners) decides.
    """

    name = "acme-policy"

    def __init__(self, catalogue: Catalogue, banned: Iterable[str] = ()) -> None:
        self.catalogue = catalogue
        self.banned = set(banned)

    def __call__(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        peer = request.peer
        if peer.fingerprint in self.banned:
            # Refused every time, and never stored.
            return succeed(
                Decision(False, "this key is banned", self.name, remember=False)
            )

        def listed(issuedAs: str | None) -> Decision | None:
            if issuedAs is None:
                return None
            if issuedAs != peer.name:
                return Decision(
                    False, f"this key was issued to {issuedAs}", self.name, False
                )
            # Remembered: signed, stored, and later connections pass at once.
            return Decision(True, f"{peer.name} is in the catalogue", self.name)

        return self.catalogue.lookup(peer.fingerprint).addCallback(listed)


#: For C{--approver python:tests.test_approvers.acmePolicy}: it knows the key
#: of L{ACME_BILLING}.
ACME_BILLING = approvalRequest()
acmePolicyClock = Clock()
acmePolicy = AcmePolicy(
    Catalogue(acmePolicyClock, {ACME_BILLING.peer.fingerprint: "acme/billing"})
)


# --- Approval callbacks, for python: specs -----------------------------------


def approveEverything(request: ApprovalRequest) -> Decision:
    return Decision(True, f"{request.peer.name} looks fine", "approveEverything")


def returnsTrue(request: ApprovalRequest) -> bool:
    return True


def returnsFalse(request: ApprovalRequest) -> bool:
    return False


def abstains(request: ApprovalRequest) -> None:
    return None


def returnsDeferred(request: ApprovalRequest) -> Deferred[Decision]:
    return succeed(Decision(False, "not today", "returnsDeferred", remember=False))


async def coroutineCallback(request: ApprovalRequest) -> bool:
    return request.peer.org == "acme"


def raises(request: ApprovalRequest) -> Decision:
    raise ZeroDivisionError("the policy divided by zero")


def failsLater(request: ApprovalRequest) -> Deferred[Decision]:
    return fail(ZeroDivisionError("the policy divided by zero, later"))


def returnsNonsense(request: ApprovalRequest) -> str:
    return "yes please"


#: Deferreds that L{holds} returned, to fire or cancel.
held: list[Deferred[Decision | None]] = []
cancelledHolds: list[Deferred[Decision | None]] = []


def holds(request: ApprovalRequest) -> Deferred[Decision | None]:
    waiting: Deferred[Decision | None] = Deferred(cancelledHolds.append)
    held.append(waiting)
    return waiting


notCallable = 42


@implementer(IApprover)
class _DenyAll:
    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return succeed(Decision(False, "no", "denyAll"))


denyAll = _DenyAll()


HERE = __name__


# --- The simple built-in approvers -------------------------------------------


class BuiltinApproverTests(SynchronousTestCase):
    """
    C{auto}, C{known-only} and C{deny}.
    """

    def test_interface(self) -> None:
        for approver in [AutoApprover(), KnownOnlyApprover(), DenyApprover()]:
            self.assertTrue(verifyObject(IApprover, approver))

    def test_auto(self) -> None:
        """
        C{auto} approves, remembers, and warns that it does.
        """
        observer = observe(self)
        decision = decide(AutoApprover())
        self.assertEqual(
            decision, Decision(True, "approved by the auto approver", "auto")
        )
        warnings = eventsOf(observer, "dwtrust.approver.auto")
        self.assertEqual(len(warnings), 2)
        self.assertTrue(all(e["log_level"] is LogLevel.warn for e in warnings))

    def test_knownOnly(self) -> None:
        decision = decide(KnownOnlyApprover())
        assert decision is not None
        self.assertFalse(decision.approved)
        self.assertFalse(decision.remember)
        self.assertEqual(decision.decidedBy, "known-only")

    def test_deny(self) -> None:
        """
        C{deny} refuses, and asks that nothing be stored.
        """
        self.assertEqual(
            decide(DenyApprover()),
            Decision(False, "denied by the deny approver", "deny", remember=False),
        )

    def test_denyStoresNothing(self) -> None:
        """
        Through a policy, C{deny} is a C{denied} refusal that leaves the store
        as it was.
        """
        store = MemoryTrustStore()
        policy = ApprovalPolicy(store, DenyApprover(), Identity.generate("acme", "x"))
        peer = approvalRequest().peer
        refusal = self.failureResultOf(policy.check(peer, "src"), Refusal).value
        self.assertEqual(refusal.code, ErrorCode.denied)
        self.assertEqual(store.peers, {})


# --- Specs ---------------------------------------------------------------------


class SpecTests(SynchronousTestCase):
    """
    L{approverFromSpecs} and friends: C{--approver} specs.
    """

    def test_simple(self) -> None:
        self.assertIsInstance(approverFromSpec("auto"), AutoApprover)
        self.assertIsInstance(approverFromSpec("known-only"), KnownOnlyApprover)
        self.assertIsInstance(approverFromSpec("deny"), DenyApprover)
        self.assertEqual(sorted(BUILTIN_APPROVERS), ["auto", "deny", "known-only"])

    def test_owners(self) -> None:
        """
        C{owners} is the owners' approver given; without one it is a
        L{ValueError} that says so.
        """
        owners = FakeApprover()
        self.assertIs(approverFromSpecs(["owners"], owners), owners)
        error = self.assertRaises(ValueError, approverFromSpecs, ["owners"], None)
        self.assertIn("'owners' approver is not available here", str(error))

    def test_webhook(self) -> None:
        approver = approverFromSpec("webhook:https://hooks.example/approve")
        assert isinstance(approver, WebhookApprover)
        self.assertEqual(approver.url, "https://hooks.example/approve")

    def test_python(self) -> None:
        approver = approverFromSpec(f"python:{HERE}.returnsTrue")
        assert isinstance(approver, PythonApprover)
        self.assertIs(approver.callback, returnsTrue)
        self.assertEqual(approver.name, f"python:{HERE}.returnsTrue")

    def test_chain(self) -> None:
        """
        Several specs are a chain, asked in their order.
        """
        owners = FakeApprover()
        approver = approverFromSpecs([f"python:{HERE}.abstains", "owners"], owners)
        assert isinstance(approver, ChainApprover)
        first, second = approver.approvers
        assert isinstance(first, PythonApprover)
        self.assertIs(first.callback, abstains)
        self.assertIs(second, owners)

    def test_unknown(self) -> None:
        """
        An unknown spec is a L{ValueError} that lists every form, in the
        documented order.
        """
        for spec in ["yes-please", "webhook:", "python:", "Auto", "webhook"]:
            error = self.assertRaises(ValueError, approverFromSpecs, [spec])
            self.assertIn(f"unknown approver {spec!r}", str(error))
            self.assertIn(", ".join(APPROVER_SPECS), str(error))
        self.assertEqual(
            APPROVER_SPECS,
            (
                "owners",
                "auto",
                "known-only",
                "deny",
                "webhook:URL",
                "python:package.module.callable",
            ),
        )

    def test_empty(self) -> None:
        self.assertRaises(ValueError, approverFromSpecs, [])
        self.assertRaises(TypeError, approverFromSpecs, "auto")

    def test_approverFromName(self) -> None:
        """
        L{approverFromName}, for endpoint strings, is one spec with no owners.
        """
        self.assertIsInstance(approverFromName("deny"), DenyApprover)
        error = self.assertRaises(ValueError, approverFromName, "yes-please")
        self.assertIn("auto, known-only", str(error))
        self.assertRaises(ValueError, approverFromName, "owners")

    def test_check(self) -> None:
        """
        L{checkApproverSpecs} finds what L{approverFromSpecs} would refuse,
        without making anything.
        """
        checkApproverSpecs(
            [
                "owners",
                "auto",
                "known-only",
                "deny",
                "webhook:https://hooks.example/",
                f"python:{HERE}.returnsTrue",
            ]
        )
        for specs in [
            [],
            ["nope"],
            ["webhook:ftp://hooks.example/"],
            [f"python:{HERE}.notCallable"],
        ]:
            self.assertRaises(ValueError, checkApproverSpecs, specs)
        self.assertRaises(ValueError, checkApproverSpecs, ["owners"], owners=False)


# --- Composition -------------------------------------------------------------


class ChainTests(SynchronousTestCase):
    """
    L{ChainApprover}: each approver in turn, until one decides.
    """

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IApprover, ChainApprover([DenyApprover()])))

    def test_empty(self) -> None:
        self.assertRaises(ValueError, ChainApprover, [])

    def test_firstDecides(self) -> None:
        """
        The first decision stands, and the approvers after it are not asked.
        """
        later = FakeApprover()
        chain = ChainApprover([DenyApprover(), later])
        decision = decide(chain)
        assert decision is not None
        self.assertEqual(decision.decidedBy, "deny")
        self.assertEqual(later.requests, [])

    def test_abstainPassesOn(self) -> None:
        """
        An approver that fires with L{None} passes the request on, and the
        next one's decision is the chain's, whenever it comes.
        """
        first, second = FakeApprover(), FakeApprover()
        chain = ChainApprover([first, second])
        request = approvalRequest()
        asked = chain.requestApproval(request)
        [pending] = first.requests
        self.assertIs(pending.request, request)
        self.assertEqual(second.requests, [])
        pending.deferred.callback(None)  # type: ignore[arg-type]
        [later] = second.requests
        self.assertIs(later.request, request)
        self.assertNoResult(asked)
        later.approve("fine")
        self.assertEqual(self.successResultOf(asked), Decision(True, "fine", "test"))

    def test_allAbstain(self) -> None:
        """
        If every approver abstains, the key is refused and nothing stored.
        """
        chain = ChainApprover([CallableApprover(abstains, "a")] * 3)
        self.assertEqual(
            decide(chain),
            Decision(False, "no approver decided", "chain", remember=False),
        )

    def test_failureEnds(self) -> None:
        """
        A failure ends the chain: the approvers after it are not asked.
        """
        later = FakeApprover()
        first = FakeApprover()
        asked = ChainApprover([first, later]).requestApproval(approvalRequest())
        first.requests[0].deferred.errback(Refusal(ErrorCode.unavailable, "full"))
        self.failureResultOf(asked, Refusal)
        self.assertEqual(later.requests, [])

    def test_cancelPropagates(self) -> None:
        """
        Cancelling the chain cancels the approver being asked, and the ones
        after it are never asked.
        """
        first, second, third = FakeApprover(), FakeApprover(), FakeApprover()
        asked = ChainApprover([first, second, third]).requestApproval(approvalRequest())
        first.requests[0].deferred.callback(None)  # type: ignore[arg-type]
        [pending] = second.requests
        asked.cancel()
        self.failureResultOf(asked, CancelledError)
        self.assertTrue(pending.cancelled)
        self.assertFalse(first.requests[0].cancelled)
        self.assertEqual(third.requests, [])

    def test_nested(self) -> None:
        """
        A chain in a chain decides when all of its own approvers abstain.
        """
        inner = ChainApprover([CallableApprover(abstains, "a")])
        later = FakeApprover()
        decision = decide(ChainApprover([inner, later]))
        assert decision is not None
        self.assertEqual(decision.decidedBy, "chain")
        self.assertEqual(later.requests, [])


class PolicyAbstainTests(SynchronousTestCase):
    """
    L{ApprovalPolicy} with an approver that abstains.
    """

    def test_abstainIsRefusal(self) -> None:
        """
        An approver asked on its own that abstains refuses the key, and
        nothing is stored.
        """
        store = MemoryTrustStore()
        policy = ApprovalPolicy(
            store, CallableApprover(abstains, "a"), Identity.generate("acme", "x")
        )
        observer = observe(self)
        refusal = self.failureResultOf(
            policy.check(approvalRequest().peer, "src"), Refusal
        ).value
        self.assertEqual(refusal.code, ErrorCode.denied)
        self.assertEqual(refusal.message, "no approver decided")
        self.assertEqual(store.peers, {})
        [event] = eventsOf(observer, "dwtrust.decision")
        self.assertEqual(event["decided_by"], "policy")


# --- Python approval callbacks -------------------------------------------------


class PythonApproverTests(TestCase):
    """
    L{PythonApprover}: C{python:package.module.callable}.
    """

    def ask(self, name: str, org: str = "acme") -> Decision | None:
        return decide(PythonApprover(f"python:{HERE}.{name}"), approvalRequest(org))

    def test_interface(self) -> None:
        approver = PythonApprover(f"{HERE}.returnsTrue")
        self.assertTrue(verifyObject(IApprover, approver))
        self.assertEqual(approver.spec, f"{HERE}.returnsTrue")
        self.assertEqual(approver.name, f"python:{HERE}.returnsTrue")

    def test_decision(self) -> None:
        """
        A L{Decision} stands as it is.
        """
        decision = self.ask("approveEverything")
        self.assertEqual(
            decision, Decision(True, "acme/billing looks fine", "approveEverything")
        )

    def test_bool(self) -> None:
        """
        L{True} and L{False} become remembered decisions, made by
        C{python:<spec>}.
        """
        by = f"python:{HERE}.returnsTrue"
        self.assertEqual(
            self.ask("returnsTrue"), Decision(True, f"approved by {by}", by)
        )
        by = f"python:{HERE}.returnsFalse"
        self.assertEqual(
            self.ask("returnsFalse"), Decision(False, f"refused by {by}", by)
        )

    def test_none(self) -> None:
        self.assertIsNone(self.ask("abstains"))

    def test_deferred(self) -> None:
        self.assertEqual(
            self.ask("returnsDeferred"),
            Decision(False, "not today", "returnsDeferred", remember=False),
        )

    def test_coroutine(self) -> None:
        decision = self.ask("coroutineCallback")
        assert decision is not None
        self.assertTrue(decision.approved)
        decision = self.ask("coroutineCallback", org="other")
        assert decision is not None
        self.assertFalse(decision.approved)

    def test_approverObject(self) -> None:
        """
        An object that provides L{IApprover} is asked through its
        C{requestApproval}.
        """
        self.assertEqual(self.ask("denyAll"), Decision(False, "no", "denyAll"))

    def assertCallbackFailed(self, name: str, error: type[Exception]) -> None:
        observer = observe(self)
        self.assertEqual(
            self.ask(name),
            Decision(
                False,
                "the approval callback failed",
                f"python:{HERE}.{name}",
                remember=False,
            ),
        )
        [event] = eventsOf(observer, "dwtrust.approver.python.failed")
        self.assertEqual(event["callback"], f"python:{HERE}.{name}")
        self.assertEqual(len(self.flushLoggedErrors(error)), 1)

    def test_raises(self) -> None:
        """
        A callback that raises refuses, storing nothing, and the failure is
        logged.
        """
        self.assertCallbackFailed("raises", ZeroDivisionError)

    def test_failsLater(self) -> None:
        self.assertCallbackFailed("failsLater", ZeroDivisionError)

    def test_nonsense(self) -> None:
        """
        A callback that returns something else refuses too.
        """
        observer = observe(self)
        decision = self.ask("returnsNonsense")
        assert decision is not None
        self.assertFalse(decision.approved)
        self.assertFalse(decision.remember)
        [event] = eventsOf(observer, "dwtrust.approver.python.failed")
        self.assertEqual(event["log_level"], LogLevel.error)
        self.assertEqual(event["result"], "yes please")

    def test_cancel(self) -> None:
        """
        Cancelling cancels the L{Deferred} the callback returned.
        """
        asked = PythonApprover(f"{HERE}.holds").requestApproval(approvalRequest())
        waiting = held.pop()
        asked.cancel()
        self.failureResultOf(asked, CancelledError)
        self.assertEqual(cancelledHolds.pop(), waiting)

    def test_later(self) -> None:
        asked = PythonApprover(f"{HERE}.holds").requestApproval(approvalRequest())
        self.assertNoResult(asked)
        held.pop().callback(None)
        self.assertIsNone(self.successResultOf(asked))

    def test_badSpecs(self) -> None:
        """
        A name that does not import, or is not callable, is a L{ValueError}
        at once, saying which and why.
        """
        for spec, expected in [
            ("nosuchmodule_dwtrust.decide", "cannot import"),
            (f"{HERE}.nothingHere", "cannot import"),
            (f"{HERE}.notCallable", "is not callable: it is int"),
            ("nodots", "must be a dotted name"),
            ("", "must be a dotted name"),
        ]:
            error = self.assertRaises(ValueError, PythonApprover, spec)
            self.assertIn(expected, str(error))
            self.assertIn(repr(spec), str(error))


# --- The webhook, against a real HTTP server on loopback -------------------------


class Hook(Resource):
    """
    A webhook that answers as the test says, and records what it is sent.

    @ivar answer: the status and body of the next responses, or L{None} to
        hold each request open.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answer: tuple[int, bytes] | None = (200, b'{"decision": "approve"}')
        self.received: list[Request] = []
        self.bodies: list[Any] = []
        self.finished: list[Deferred[None]] = []
        self._arrivals: list[Deferred[Request]] = []

    def arrival(self) -> Deferred[Request]:
        """
        A L{Deferred} that fires with the next request.
        """
        arriving: Deferred[Request] = Deferred()
        self._arrivals.append(arriving)
        return arriving

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        self.received.append(request)
        self.bodies.append(json.loads(request.content.read()))
        self.finished.append(request.notifyFinish())
        arrivals, self._arrivals = self._arrivals, []
        for arriving in arrivals:
            arriving.callback(request)
        if self.answer is None:
            return NOT_DONE_YET
        status, body = self.answer
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body


class WebhookTests(TestCase):
    """
    L{WebhookApprover} against a real web server on 127.0.0.1.
    """

    def setUp(self) -> None:
        self.hook = Hook()
        self.port: IListeningPort = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Site(self.hook), interface=LOOPBACK
        )
        self.addCleanup(self.port.stopListening)
        self.url = f"http://{LOOPBACK}:{self.port.getHost().port}/hook"
        self.observer = observe(self)
        self.request = approvalRequest(source="10.1.2.3:4567")

    def tearDown(self) -> Deferred[object]:
        # Wait until the server has seen every connection end, so that none
        # is left in the reactor.
        return Deferred.fromCoroutine(self._settle())

    async def _settle(self) -> object:
        for finished in self.hook.finished:
            with contextlib.suppress(Exception):
                await finished
        # Let the server's side of each connection close.
        return await deferLater(reactor, 0.01, lambda: None)

    def approver(self, url: str | None = None, timeout: float = 5.0) -> WebhookApprover:
        return WebhookApprover(url or self.url, timeout=timeout)

    def ask(self, url: str | None = None, timeout: float = 5.0) -> Deferred[Any]:
        return self.approver(url, timeout).requestApproval(self.request)

    def failures(self) -> list[dict[str, Any]]:
        return eventsOf(self.observer, "dwtrust.approver.webhook.failed")

    def assertAbstainedWithWarning(
        self, decision: object, error: str, seen: int = 0
    ) -> None:
        """
        The webhook abstained, and logged one warning (after the C{seen}
        earlier ones), without a traceback, that says C{error}.
        """
        self.assertIsNone(decision)
        [event] = self.failures()[seen:]
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn(error, event["error"])
        self.assertEqual(event["url"], self.url)
        self.assertEqual(event["fingerprint"], self.request.peer.fingerprint)
        self.assertNotIn("log_failure", event)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IApprover, self.approver()))

    def test_request(self) -> Deferred[None]:
        """
        The webhook receives a POST of an C{approval_requested} control
        message, as JSON, with the key as an OpenSSH line.
        """

        async def run() -> None:
            await self.ask()
            [request] = self.hook.received
            self.assertEqual(request.method, b"POST")
            self.assertEqual(request.uri, b"/hook")
            self.assertEqual(request.getHeader(b"content-type"), b"application/json")
            [body] = self.hook.bodies
            peer = self.request.peer
            self.assertEqual(
                body, approvalMessage(self.request) | {"time": body["time"]}
            )
            self.assertEqual(body["kind"], "approval_requested")
            self.assertEqual(body["service"], "acme/ledger")
            self.assertEqual(body["fingerprint"], peer.fingerprint)
            self.assertEqual(body["org"], "acme")
            self.assertEqual(body["peerService"], "billing")
            self.assertEqual(body["algorithm"], "ssh-ed25519")
            self.assertEqual(body["source"], "10.1.2.3:4567")
            self.assertEqual(body["publicKey"], peer.publicKey.openssh())

        return Deferred.fromCoroutine(run())

    def test_approve(self) -> Deferred[None]:
        async def run() -> None:
            self.hook.answer = (200, b'{"decision": "approve", "reason": "on call"}')
            decision = await self.ask()
            self.assertEqual(decision, Decision(True, "on call", f"webhook:{self.url}"))
            self.assertEqual(self.failures(), [])

        return Deferred.fromCoroutine(run())

    def test_deny(self) -> Deferred[None]:
        async def run() -> None:
            self.hook.answer = (200, b'{"decision": "deny", "remember": false}')
            decision = await self.ask()
            self.assertEqual(
                decision,
                Decision(False, "denied by the webhook", f"webhook:{self.url}", False),
            )

        return Deferred.fromCoroutine(run())

    def test_accepted(self) -> Deferred[None]:
        """
        C{202 Accepted} abstains, without a warning: the decision will come
        from the next approver.
        """

        async def run() -> None:
            self.hook.answer = (202, b"")
            self.assertIsNone(await self.ask())
            self.assertEqual(self.failures(), [])
            [event] = eventsOf(self.observer, "dwtrust.approver.webhook.pending")
            self.assertEqual(event["log_level"], LogLevel.info)

        return Deferred.fromCoroutine(run())

    def test_pending(self) -> Deferred[None]:
        async def run() -> None:
            self.hook.answer = (200, b'{"decision": "pending"}')
            self.assertIsNone(await self.ask())
            self.assertEqual(self.failures(), [])

        return Deferred.fromCoroutine(run())

    def test_serverError(self) -> Deferred[None]:
        """
        Another status abstains, with a warning and no traceback.
        """

        async def run() -> None:
            self.hook.answer = (500, b'{"decision": "approve"}')
            self.assertAbstainedWithWarning(await self.ask(), "HTTP status 500")

        return Deferred.fromCoroutine(run())

    def test_badAnswers(self) -> Deferred[None]:
        """
        A body that is not JSON, or not the JSON expected, abstains with a
        warning.
        """
        answers = [
            (b"<html>yes</html>", "not JSON"),
            (b"\xff\xfe", "not JSON"),
            (b'["approve"]', "not a JSON object"),
            (b'{"decision": "yes"}', '"decision" is not'),
            (b'{"decision": true}', '"decision" is not'),
            (b'{"decision": "approve", "reason": 7}', '"reason" is not a string'),
            (b'{"decision": "approve", "remember": 1}', '"remember" is not'),
        ]

        async def run() -> None:
            for seen, (body, error) in enumerate(answers):
                self.hook.answer = (200, body)
                self.assertAbstainedWithWarning(await self.ask(), error, seen)

        return Deferred.fromCoroutine(run())

    def test_tooLarge(self) -> Deferred[None]:
        async def run() -> None:
            padding = b" " * MAX_RESPONSE_BYTES
            self.hook.answer = (200, b'{"decision": "approve"}' + padding)
            self.assertAbstainedWithWarning(await self.ask(), "larger than")

        return Deferred.fromCoroutine(run())

    def test_longReason(self) -> Deferred[None]:
        async def run() -> None:
            reason = "x" * 1000
            self.hook.answer = (
                200,
                json.dumps({"decision": "deny", "reason": reason}).encode(),
            )
            decision = await self.ask()
            self.assertEqual(decision.reason, "x" * 200)

        return Deferred.fromCoroutine(run())

    def test_timeout(self) -> Deferred[None]:
        """
        A webhook that does not answer in time abstains with a warning, and
        its request is abandoned.
        """

        async def run() -> None:
            self.hook.answer = None
            decision = await self.ask(timeout=0.2)
            self.assertAbstainedWithWarning(decision, "TimeoutError")
            [finished] = self.hook.finished
            # The server sees the connection go.
            await self.assertFailure(finished, Exception)

        return Deferred.fromCoroutine(run())

    def test_cancel(self) -> Deferred[None]:
        """
        Cancelling cancels the request: the connection is closed, and nothing
        is logged.
        """

        async def run() -> None:
            self.hook.answer = None
            arriving = self.hook.arrival()
            asked = self.ask()
            await arriving
            asked.cancel()
            await self.assertFailure(asked, CancelledError)
            [finished] = self.hook.finished
            await self.assertFailure(finished, Exception)
            self.assertEqual(self.failures(), [])

        return Deferred.fromCoroutine(run())

    def test_connectionRefused(self) -> Deferred[None]:
        """
        A webhook that cannot be reached abstains with a warning.
        """
        # A bound socket that does not listen refuses connections.
        closed = socket.socket()
        self.addCleanup(closed.close)
        closed.bind((LOOPBACK, 0))
        self.url = f"http://{LOOPBACK}:{closed.getsockname()[1]}/hook"

        async def run() -> None:
            decision = await self.ask()
            self.assertAbstainedWithWarning(decision, "ConnectionRefusedError")

        return Deferred.fromCoroutine(run())

    def test_secretsNotLogged(self) -> Deferred[None]:
        """
        User information becomes basic authentication; it and the query are
        sent, but never logged.
        """
        port = self.port.getHost().port
        secret = f"http://hook:s3cret%21@{LOOPBACK}:{port}/hook?token=t0ken#frag"

        async def run() -> None:
            self.hook.answer = (500, b"")
            approver = WebhookApprover(secret)
            self.assertEqual(approver.safeURL, self.url)
            self.assertEqual(approver.name, f"webhook:{self.url}")
            self.assertIsNone(await approver.requestApproval(self.request))
            [request] = self.hook.received
            self.assertEqual(request.uri, b"/hook?token=t0ken")
            self.assertEqual(
                request.getHeader(b"authorization"),
                b"Basic " + base64.b64encode(b"hook:s3cret!"),
            )
            self.assertEqual(
                (request.getUser(), request.getPassword()), (b"hook", b"s3cret!")
            )
            # What the client side logs (not the test server's access log).
            logged = repr(
                [
                    e
                    for e in self.observer
                    if e["log_namespace"].startswith(("dwtrust", "twisted.web.client"))
                ]
            )
            self.assertIn("dwtrust.approver.webhook.failed", logged)
            for text in ["s3cret", "t0ken", "frag"]:
                self.assertNotIn(text, logged)

        return Deferred.fromCoroutine(run())

    def test_insecureWarning(self) -> None:
        """
        Plain http to another host is a warning; to this one, and https, are
        not.
        """
        WebhookApprover("http://localhost:8080/hook")
        WebhookApprover(f"http://{LOOPBACK}/hook")
        WebhookApprover("http://[::1]/hook")
        WebhookApprover("https://hooks.example/hook")
        self.assertEqual(
            eventsOf(self.observer, "dwtrust.approver.webhook.insecure"), []
        )
        WebhookApprover("http://user:pw@hooks.example/hook?token=x")
        [event] = eventsOf(self.observer, "dwtrust.approver.webhook.insecure")
        self.assertEqual(event["url"], "http://hooks.example/hook")

    def test_badURLs(self) -> None:
        """
        A URL that is not absolute http or https is a L{ValueError} at once,
        which does not repeat secrets.
        """
        for url, expected in [
            ("", "is empty"),
            ("ftp://hooks.example/", "http:// or https://"),
            ("hooks.example/approve", "http:// or https://"),
            ("/approve", "http:// or https://"),
            ("http:///approve?token=secret", "has no host"),
            ("https://hooks.example:99999/", "bad port"),
            ("https://hooks.example:0/", "bad port"),
            ("https://hooks.example/a b", "no spaces"),
            ("https://hooks.exämple/", "ASCII"),
        ]:
            error = self.assertRaises(ValueError, WebhookApprover, url)
            self.assertIn(expected, str(error))
            self.assertNotIn("secret", str(error))
        self.assertRaises(ValueError, WebhookApprover, self.url, timeout=0)

    def test_redactURL(self) -> None:
        self.assertEqual(
            redactURL("https://u:p@h.example:8443/a/b?token=x#y"),
            "https://h.example:8443/a/b",
        )

    def test_inChain(self) -> Deferred[None]:
        """
        A webhook that says "pending" leaves the decision to the owners.
        """

        async def run() -> None:
            self.hook.answer = (202, b"")
            asked: list[ApprovalRequest] = []

            def owners(request: ApprovalRequest) -> Decision:
                asked.append(request)
                return Decision(True, "the owner said yes", "owner")

            chain = ChainApprover([self.approver(), CallableApprover(owners, "o")])
            decision = await chain.requestApproval(self.request)
            self.assertEqual(decision, Decision(True, "the owner said yes", "owner"))
            self.assertEqual(asked, [self.request])

        return Deferred.fromCoroutine(run())


# --- A user's own policy, tested with dwtrust.testing ------------------------


class AcmePolicyTests(SynchronousTestCase):
    """
    L{AcmePolicy}, a user-written approval callback returning a L{Deferred},
    tested in memory with L{dwtrust.testing}: on its own, and in front of the
    owners (a L{FakeApprover}) through an L{ApprovalPolicy}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.billing = approvalRequest(org="acme", service="billing")
        self.banned = approvalRequest(org="evil")
        self.policy = AcmePolicy(
            Catalogue(self.clock, {self.billing.peer.fingerprint: "acme/billing"}),
            [self.banned.peer.fingerprint],
        )
        self.owners = FakeApprover()
        self.store = MemoryTrustStore()
        self.approver = ChainApprover(
            [CallableApprover(self.policy, "acme-policy"), self.owners]
        )
        self.service = Identity.generate("acme", "ledger")
        self.trust = ApprovalPolicy(self.store, self.approver, self.service)

    def test_decide(self) -> None:
        """
        C{decide} runs the callback as C{--approver python:...} would.
        """
        banned = decide(self.policy, self.banned)
        self.assertEqual(
            banned, Decision(False, "this key is banned", "acme-policy", False)
        )
        # Every other key waits for the catalogue.
        self.assertRaises(NotDecided, decide, self.policy, self.billing)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_listedKeyApproved(self) -> None:
        """
        A key in the catalogue, with the name it was issued for, is approved
        once the lookup is done; the approval is signed and stored, and the
        owners are not asked.
        """
        peer = self.billing.peer
        checked = self.trust.check(peer, "10.0.0.1:1234")
        self.assertNoResult(checked)
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(checked))
        record = self.successResultOf(self.store.lookup(peer.fingerprint))
        assert record is not None
        self.assertIs(record.state, KeyState.approved)
        self.assertEqual(record.decidedBy, "acme-policy")
        self.assertIsNotNone(self.trust.decisions.verify(record))
        self.assertEqual(self.owners.requests, [])

    def test_listedKeyClaimingAnotherNameRefused(self) -> None:
        """
        A key in the catalogue that claims a name other than the one it was
        issued for is refused, and nothing is stored.
        """
        impostor = PeerIdentity("acme", "admin", self.billing.peer.publicKey)
        checked = self.trust.check(impostor, "src")
        self.clock.advance(0.5)
        refusal = self.failureResultOf(checked, Refusal).value
        self.assertEqual(refusal.code, ErrorCode.denied)
        self.assertIn("acme/billing", refusal.message)
        self.assertEqual(self.store.peers, {})
        self.assertEqual(self.owners.requests, [])

    def test_bannedRefused(self) -> None:
        """
        A banned key is refused at once, and nothing is stored.
        """
        peer = self.banned.peer
        refusal = self.failureResultOf(self.trust.check(peer, "src"), Refusal).value
        self.assertEqual(refusal.code, ErrorCode.denied)
        self.assertEqual(refusal.message, "this key is banned")
        self.assertEqual(self.store.peers, {})
        self.assertEqual(self.owners.requests, [])

    def test_othersGoToTheOwners(self) -> None:
        """
        Keys the catalogue does not list, even claiming a listed name, are
        the owners' to decide.
        """
        other = approvalRequest(org="other").peer
        unlisted = approvalRequest(org="acme", service="billing").peer
        checkedOther = self.trust.check(other, "src")
        checkedUnlisted = self.trust.check(unlisted, "src")
        self.clock.advance(0.5)
        first, second = self.owners.requests
        self.assertEqual(first.request.peer, other)
        self.assertEqual(second.request.peer, unlisted)
        first.approve()
        second.deny()
        self.assertIsNone(self.successResultOf(checkedOther))
        self.failureResultOf(checkedUnlisted, Refusal)

    def test_clientGoesAway(self) -> None:
        """
        When the client goes away during the lookup, the lookup is cancelled.
        """
        checked = self.trust.check(approvalRequest().peer, "src")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        checked.cancel()
        self.failureResultOf(checked, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.store.peers, {})

    def test_heldConnectionGoesOn(self) -> None:
        """
        End to end, in memory: the client's connection is held while the
        policy looks it up, and goes on when it approves.
        """
        client = Identity.generate("acme", "billing")
        self.policy.catalogue.keys[client.fingerprint] = "acme/billing"
        server = memoryAuthenticator(
            self.service, self.store, self.approver, self.clock
        )
        clientSide = memoryAuthenticator(
            client, MemoryTrustStore(), FakeApprover(), self.clock
        )
        serverApp, clientApp = Connected(), Connected()
        _, _, pump = connectInMemory(
            server,
            Factory.forProtocol(lambda: serverApp),
            clientSide,
            Factory.forProtocol(lambda: clientApp),
            self.clock,
        )
        self.assertFalse(serverApp.connected)
        self.clock.advance(0.5)
        pump.flush()
        self.assertTrue(serverApp.connected)
        self.assertEqual(serverApp.transport.peer.fingerprint, client.fingerprint)


class Connected(Protocol):
    connected = False
    transport: Any

    def connectionMade(self) -> None:
        self.connected = True


class PythonSpecExampleTests(SynchronousTestCase):
    """
    The example policy, chosen as C{python:tests.test_approvers.acmePolicy}.
    """

    def test_spec(self) -> None:
        approver = approverFromSpecs(
            [f"python:{HERE}.acmePolicy", "owners"], FakeApprover()
        )
        assert isinstance(approver, ChainApprover)
        asked = approver.requestApproval(ACME_BILLING)
        self.assertNoResult(asked)
        acmePolicyClock.advance(0.5)
        decision = self.successResultOf(asked)
        self.assertEqual(
            decision, Decision(True, "acme/billing is in the catalogue", "acme-policy")
        )


# --- dwtrust.testing ---------------------------------------------------------


class TestingHelperTests(SynchronousTestCase):
    """
    L{approvalRequest} and L{decide}.
    """

    def test_approvalRequest(self) -> None:
        request = approvalRequest()
        self.assertEqual(request.peer.name, "acme/billing")
        self.assertEqual(request.source, "10.0.0.1:1234")
        self.assertEqual(request.service, "acme/ledger")
        self.assertEqual(request.peer.algorithm, "ssh-ed25519")
        self.assertNotEqual(
            approvalRequest().peer.fingerprint, request.peer.fingerprint
        )
        other = approvalRequest("evil", "x", "1.2.3.4:5", "acme/y", "ecdsa-p256")
        self.assertEqual(other.peer.name, "evil/x")
        self.assertEqual(other.peer.algorithm, "ecdsa-sha2-nistp256")
        self.assertEqual((other.source, other.service), ("1.2.3.4:5", "acme/y"))
        self.assertIsInstance(other.peer, PeerIdentity)

    def test_decideCallable(self) -> None:
        """
        A callback is run as L{PythonApprover} runs it.
        """
        self.assertEqual(
            decide(returnsTrue), Decision(True, "approved by test", "test")
        )
        self.assertIsNone(decide(abstains))

    def test_notDecided(self) -> None:
        """
        An approver that has not decided is cancelled, and
        L{NotDecided} raised.
        """
        owners = FakeApprover()
        self.assertRaises(NotDecided, decide, owners)
        self.assertTrue(owners.requests[0].cancelled)

    def test_failure(self) -> None:
        """
        What the approver's L{Deferred} fails with is raised.
        """
        owners = FakeApprover()
        chain = ChainApprover([_Unavailable(), owners])
        self.assertRaises(Refusal, decide, chain)
        self.assertEqual(owners.requests, [])


@implementer(IApprover)
class _Unavailable:
    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return fail(Refusal(ErrorCode.unavailable))


# --- docs/approval.rst ---------------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "approval.rst"


class DocsTests(SynchronousTestCase):
    """
    What C{docs/approval.rst} says matches the code.  (Its worked example is
    included from this module.)
    """

    def setUp(self) -> None:
        self.text = DOCS.read_text(encoding="utf-8")

    def codeBlocks(self, language: str) -> list[str]:
        blocks = []
        lines = self.text.splitlines()
        for i, line in enumerate(lines):
            if line.strip() == f".. code-block:: {language}":
                block = []
                for following in lines[i + 2 :]:
                    if following and not following.startswith("    "):
                        break
                    block.append(following)
                blocks.append("\n".join(block))
        return blocks

    def test_webhookRequest(self) -> None:
        """
        The webhook request shown has exactly the fields sent, and its
        fingerprint is its key's.
        """
        [shown] = [
            json.loads(block)
            for block in self.codeBlocks("json")
            if "approval_requested" in block
        ]
        sent = approvalMessage(approvalRequest())
        self.assertEqual(sorted(shown), sorted(sent))
        key = PublicKey.fromOpenSSH(shown["publicKey"])
        self.assertEqual(shown["fingerprint"], key.fingerprint)

    def test_specs(self) -> None:
        """
        Every spec is documented.
        """
        for spec in APPROVER_SPECS:
            self.assertIn(f"``{spec}``", self.text)

    def test_includes(self) -> None:
        """
        The objects the page includes from this module exist.
        """
        for name in re.findall(r":pyobject: (\S+)", self.text):
            found: object = globals()[name.split(".")[0]]
            for attribute in name.split(".")[1:]:
                found = getattr(found, attribute)
            self.assertTrue(callable(found), name)
