"""
The owners approver: trust on first use with the service's owners in the
loop, as ssh asks about an unknown host key.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._authority import refuseChangedIdentity
from .._bus import ControlBus, ControlMessage
from .._decision import SignedDecision
from .._machine import Refusal
from .._wire import ErrorCode
from ..store import IStoreEvents, ITrustStore, KeyState, PendingFull, StoreChange
from ._interface import ApprovalRequest, Decision, IApprover
from ._limits import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    DEFAULT_PENDING_RESERVE,
    DEFAULT_REQUEST_TTL,
    KnownSources,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_PER_SOURCE",
    "DEFAULT_PENDING_RESERVE",
    "DEFAULT_REQUEST_TTL",
    "OwnersApprover",
    "announceFleetRequests",
    "newRequestId",
]


def newRequestId() -> str:
    """
    A short random identifier, easy to type by a unique prefix.
    """
    return secrets.token_hex(5)


def _stop(waiting: Deferred[SignedDecision]) -> None:
    """
    Stop a wait nobody needs: its cancellation is no error to log.
    """

    def cancelled(failure: Failure) -> None:
        failure.trap(CancelledError)

    waiting.addErrback(cancelled)
    waiting.cancel()


@implementer(IApprover)
class OwnersApprover:
    """
    Records an unknown key as one pending request (one per key), sends a
    control message to the owners, and waits for their signed decision, which
    arrives through the L{ControlBus}.  The connection's wait is bounded by
    its decision timeout; the request outlives it, until it expires.

    Pending requests are capped per address prefix (see
    L{dwtrust.store.sourceHost}) and in all; C{reserved} of the total are
    kept for the prefixes in C{known} (where approved keys connected from).
    """

    name = "owners"
    log = Logger()

    def __init__(
        self,
        store: ITrustStore,
        bus: ControlBus,
        ttl: float = DEFAULT_REQUEST_TTL,
        maxPending: int = DEFAULT_MAX_PENDING,
        maxPendingPerSource: int = DEFAULT_MAX_PENDING_PER_SOURCE,
        now: Callable[[], float] = time.time,
        known: KnownSources | None = None,
        reserved: int = 0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.ttl = ttl
        self.maxPending = maxPending
        self.maxPendingPerSource = maxPendingPerSource
        self._now = now
        self.known = known
        self.reserved = reserved

    def _maxTotal(self, source: str) -> int:
        if self.known is not None and source in self.known:
            return self.maxPending
        return max(self.maxPending - self.reserved, 0)

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return Deferred.fromCoroutine(self._request(request))

    async def _request(self, request: ApprovalRequest) -> Decision:
        peer = request.peer
        # Wait before the store call, so that a decision made meanwhile is
        # not missed.
        waiting = self.bus.waitFor(peer.fingerprint)
        try:
            record, created = await self.store.addPending(
                peer,
                request.source,
                newRequestId(),
                self._now() + self.ttl,
                self.maxPendingPerSource,
                self._maxTotal(request.source),
            )
        except PendingFull as e:
            _stop(waiting)
            raise Refusal(ErrorCode.unavailable, str(e)) from None
        except BaseException:
            _stop(waiting)
            raise
        if (record.org, record.service) != (peer.org, peer.service):
            # The request the owners see names the identity first proved
            # with this key; a connection claiming another is refused.
            _stop(waiting)
            knownAs = f"{record.org}/{record.service}"
            raise refuseChangedIdentity(
                self.bus,
                request.service,
                peer,
                request.source,
                f"{peer.fingerprint} claims {peer.name}, but it is pending"
                f" as {knownAs}",
                knownAs=knownAs,
            )
        if created:
            known = await self.store.keysFor(peer.org, peer.service)
            self.bus.publish(
                ControlMessage.approvalRequested(
                    request.service,
                    record,
                    tuple(
                        k.fingerprint
                        for k in known
                        if k.fingerprint != peer.fingerprint
                    ),
                )
            )
        decision: SignedDecision = await waiting
        return Decision(
            decision.state == "approved",
            decision.reason or f"{decision.state} by an owner",
            decision.signer,
            remember=False,
            signed=decision,
        )


def announceFleetRequests(store: IStoreEvents, bus: ControlBus, service: str) -> None:
    """
    Tell the owners watching this instance of the requests raised through
    the other instances that share C{store}.
    """

    def changed(change: StoreChange) -> None:
        record = change.record
        if (
            not change.local
            and record is not None
            and change.kind == "pending"
            and record.state is KeyState.pending
        ):
            bus.publish(
                ControlMessage.approvalRequested(
                    service, record, note="asked through another instance"
                )
            )

    store.watch(changed)
