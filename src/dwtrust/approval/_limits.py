"""
The caps every approver runs behind, the owners' and the machines' alike
(invariant 3, "a stranger's cost is bounded"): how many unknown keys one
address prefix, and all of them, may have asked about within a window, and
how many machine approvers' calls (webhooks, Python callbacks) run at once.
A request past a cap is refused with C{unavailable}, and no approver is
asked.

Sources are grouped by address prefix (L{dwtrust.store.sourceHost}: an
IPv4 /24, an IPv6 /64).  A share of the total (C{reserved}) is kept for the
prefixes a key the service approved connected from (L{KnownSources}), so
that strangers filling the rest do not lock out a new key from a network
the service already works with.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from attrs import evolve, frozen, mutable
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._bus import ControlMessage
from .._machine import Refusal
from .._wire import ErrorCode
from ..store import PendingFull, sourceHost
from ..store._interface import checkPendingCaps
from ._interface import ApprovalRequest, Decision, IApprover

#: Seconds a pending request lives, unless an owner decides sooner.  An
#: hour: long enough for an owner who is told at once (C{dwtrust watch}, a
#: webhook) to answer, and a client that still wants in raises its request
#: again at its next attempt; short enough that requests a flood leaves
#: behind free their places within the hour, not the next day.
DEFAULT_REQUEST_TTL = 3600.0
#: Unknown keys waiting (or asked about, within a request's lifetime) at
#: most, in all.
DEFAULT_MAX_PENDING = 1000
#: ... and from one address prefix (an IPv4 /24, an IPv6 /64).
DEFAULT_MAX_PENDING_PER_SOURCE = 10
#: How many of L{DEFAULT_MAX_PENDING} are kept for prefixes an approved key
#: connected from: strangers elsewhere share the rest.
DEFAULT_PENDING_RESERVE = 200
#: Machine approvers' calls (webhooks, Python callbacks) under way at once.
DEFAULT_MAX_APPROVER_CALLS = 16
#: The most prefixes L{KnownSources} remembers.
MAX_KNOWN_SOURCES = 10_000


class KnownSources:
    """
    The address prefixes that keys the service approved connected from,
    since it started: the most recently seen L{MAX_KNOWN_SOURCES}.
    """

    def __init__(self, limit: int = MAX_KNOWN_SOURCES) -> None:
        self._limit = limit
        self._prefixes: OrderedDict[str, None] = OrderedDict()

    def add(self, source: str) -> None:
        """
        An approved key connected from C{source}.
        """
        prefix = sourceHost(source)
        self._prefixes[prefix] = None
        self._prefixes.move_to_end(prefix)
        while len(self._prefixes) > self._limit:
            self._prefixes.popitem(last=False)

    def __contains__(self, source: object) -> bool:
        return isinstance(source, str) and sourceHost(source) in self._prefixes

    def __len__(self) -> int:
        return len(self._prefixes)


@frozen
class ApproverLimits:
    """
    The caps of L{LimitedApprover}.

    @ivar maxPerSource: unknown keys asked about from one prefix.
    @ivar maxTotal: unknown keys asked about in all.
    @ivar reserved: how many of C{maxTotal} only known prefixes may use.
    @ivar maxCalls: machine approvers' calls under way at once.
    @ivar window: seconds a key asked about stays counted (the request
        lifetime), unless it is approved sooner.
    """

    maxPerSource: int = DEFAULT_MAX_PENDING_PER_SOURCE
    maxTotal: int = DEFAULT_MAX_PENDING
    reserved: int = DEFAULT_PENDING_RESERVE
    maxCalls: int = DEFAULT_MAX_APPROVER_CALLS
    window: float = DEFAULT_REQUEST_TTL

    def totalFor(self, source: str, known: KnownSources | None) -> int:
        """
        The total cap that applies to a request from C{source}.
        """
        if known is not None and source in known:
            return self.maxTotal
        return max(self.maxTotal - self.reserved, 0)


@mutable
class _Asked:
    prefix: str
    since: float
    #: A machine approver's refusal, answered again without asking.
    refusal: Decision | None = None


def _unavailable(request: ApprovalRequest, reason: str) -> Refusal:
    LimitedApprover.log.warn(
        "dwtrust: REFUSED {peer_name} {fingerprint} from {source}: {reason}",
        event="dwtrust.approver.limited",
        peer_name=request.peer.name,
        fingerprint=request.peer.fingerprint,
        source=request.source,
        reason=reason,
    )
    return Refusal(ErrorCode.unavailable, reason + "; try again later")


def _ask(approver: IApprover, request: ApprovalRequest) -> Deferred[Decision | None]:
    return cast("Deferred[Decision | None]", approver.requestApproval(request))


class ApproverCalls:
    """
    The count of machine approvers' calls under way, shared by every
    L{CallLimited} approver of a daemon.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0


@implementer(IApprover)
class CallLimited:
    """
    A machine approver (a webhook, a Python callback) run only while fewer
    than C{calls.limit} such calls are under way; otherwise the request is
    refused with C{unavailable} and it is not called.
    """

    def __init__(self, approver: IApprover, calls: ApproverCalls) -> None:
        self.approver = approver
        self.calls = calls
        self.name = getattr(approver, "name", repr(approver))

    def __repr__(self) -> str:
        return f"<CallLimited {self.approver!r}>"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        if self.calls.running >= self.calls.limit:
            return fail(
                _unavailable(
                    request,
                    f"{self.calls.running} approver calls are under way"
                    f" (at most {self.calls.limit})",
                )
            )
        self.calls.running += 1

        def done(result: object) -> object:
            self.calls.running -= 1
            return result

        asking: Deferred[Decision | None] = _ask(self.approver, request)
        return asking.addBoth(done)


@implementer(IApprover)
class LimitedApprover:
    """
    Runs an approver (a whole chain) behind per-prefix and total caps on
    the distinct unknown keys asked about within C{limits.window}.

    A key is counted from its first request until it is approved or the
    window lapses; asking again about a counted key costs no new place.  A
    refusal by a machine approver (no owner's signature behind it) is not
    stored: it is kept here, in memory, and answered again without asking
    until the window lapses; so the store does not grow with strangers'
    keys, and neither do the approvers' calls.

    @ivar known: the prefixes the reserved share is for.
    """

    log = Logger()
    name = "limits"

    def __init__(
        self,
        approver: IApprover,
        limits: ApproverLimits,
        known: KnownSources | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.approver = approver
        self.limits = limits
        self.known = known
        self._now = now
        self._asked: OrderedDict[str, _Asked] = OrderedDict()
        self._perPrefix: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<LimitedApprover {self.approver!r}>"

    def __len__(self) -> int:
        return len(self._asked)

    def _forget(self, fingerprint: str) -> None:
        asked = self._asked.pop(fingerprint, None)
        if asked is None:
            return
        left = self._perPrefix.get(asked.prefix, 0) - 1
        if left > 0:
            self._perPrefix[asked.prefix] = left
        else:
            self._perPrefix.pop(asked.prefix, None)

    def _prune(self, now: float) -> None:
        while self._asked:
            fingerprint, asked = next(iter(self._asked.items()))
            if asked.since > now - self.limits.window:
                break
            self._forget(fingerprint)

    def heard(self, message: ControlMessage) -> None:
        """
        A control message: after a C{decided} one (a signed decision about
        a key put in force, an owner's or an approver's), the key is counted
        no more, since a key with a decision in force is not asked about
        again.  So an owner who denies a flood's requests frees their
        places.  Watch the service's L{ControlBus} with it.
        """
        if message.kind == "decided":
            self._forget(message.fingerprint)

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        self._prune(self._now())
        fingerprint = request.peer.fingerprint
        asked = self._asked.get(fingerprint)
        if asked is not None and asked.refusal is not None:
            return succeed(asked.refusal)
        if asked is None:
            prefix = sourceHost(request.source)
            try:
                checkPendingCaps(
                    prefix,
                    self._perPrefix.get(prefix, 0),
                    len(self._asked),
                    self.limits.maxPerSource,
                    self.limits.totalFor(request.source, self.known),
                    "unknown keys asked about",
                )
            except PendingFull as e:
                return fail(_unavailable(request, str(e)))
            asked = self._asked[fingerprint] = _Asked(prefix, self._now())
            self._perPrefix[prefix] = self._perPrefix.get(prefix, 0) + 1
            new = True
        else:
            new = False
        counted = asked

        def answered(decision: Decision | None) -> Decision | None:
            if decision is None or self._asked.get(fingerprint) is not counted:
                return decision
            if decision.approved:
                self._forget(fingerprint)
                if self.known is not None:
                    self.known.add(request.source)
            elif decision.signed is None:
                counted.refusal = evolve(decision, remember=False)
                return counted.refusal
            return decision

        def failed(failure: Failure) -> Failure:
            refusal = failure.value
            if (
                new
                and not failure.check(CancelledError)
                and isinstance(refusal, Refusal)
                and refusal.code is ErrorCode.unavailable
                and self._asked.get(fingerprint) is counted
            ):
                # Refused for a cap further on: nothing is held for it.
                self._forget(fingerprint)
            return failure

        asking: Deferred[Decision | None] = _ask(self.approver, request)
        return asking.addCallbacks(answered, failed)
