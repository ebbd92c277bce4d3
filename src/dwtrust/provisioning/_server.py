"""
The running instance's end of provisioning: join tokens it issued, key
requests waiting for the owners, and the locator that answers the
provisioning commands on the control channel for keys that are not owners.

Nothing leaves the service unless an owner said so: either by issuing a join
token that the new instance redeems (once, before it lapses), or by signing a
C{release} decision for one router's waiting key request.  Each step is an
audit event (C{dwtrust.join.*}, C{dwtrust.key_request.*}).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from .._authority import Decisions
from .._bus import ControlBus, ControlMessage
from .._decision import DecisionError, SignedDecision, registerOwner
from .._identity import Identity, IdentityError, PeerIdentity, validateName
from ..approval._owners import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    DEFAULT_REQUEST_TTL,
    newRequestId,
)
from ..control._protocol import (
    PAGE_BYTES,
    ControlFailed,
    Decide,
    ListPeers,
    ListPending,
    NotAnOwner,
    Watch,
)
from ..store import ITrustStore, PendingFull, sourceHost
from ..store._interface import checkPendingCaps
from ._commands import (
    CollectKey,
    IssueJoinToken,
    Join,
    KeyRequestRefused,
    RequestKey,
    ServiceRecords,
)
from ._tokens import JoinRefused, JoinReused, JoinTokens

#: How far before a key request a release decision may have been signed
#: (clock skew between the owner and the service).
RELEASE_SKEW = 300.0


def _escaped(text: str) -> str:
    """
    C{text} with anything unprintable escaped, for the log.
    """
    return text.encode("unicode_escape").decode("ascii")


@define(eq=False)
class KeyRequest:
    """
    One router's waiting request for the service's key.

    @ivar requestId: its identifier, for the owners.
    @ivar peer: the router's authenticated identity.
    @ivar source: where it connected from.
    @ivar instance: the name it gave for itself.
    @ivar firstSeen: when it asked.
    @ivar expires: when it lapses.
    """

    requestId: str
    peer: PeerIdentity
    source: str
    instance: str
    firstSeen: float
    expires: float
    waiting: list[Deferred[str]] = field(factory=list)
    timer: IDelayedCall | None = None

    @property
    def fingerprint(self) -> str:
        return self.peer.fingerprint


class KeyRequests:
    """
    The key requests waiting for the owners, in memory: a request lives
    while its router stays connected, until an owner answers, or until it
    lapses, whichever comes first.  One request per router key; capped per
    source host and in all.
    """

    log = Logger()

    def __init__(
        self,
        serviceName: str,
        bus: ControlBus,
        clock: IReactorTime,
        ttl: float = DEFAULT_REQUEST_TTL,
        maxPending: int = DEFAULT_MAX_PENDING,
        maxPendingPerSource: int = DEFAULT_MAX_PENDING_PER_SOURCE,
    ) -> None:
        self.serviceName = serviceName
        self.bus = bus
        self.clock = clock
        self.ttl = ttl
        self.maxPending = maxPending
        self.maxPendingPerSource = maxPendingPerSource
        self._requests: dict[str, KeyRequest] = {}

    def __iter__(self) -> Any:
        return iter(sorted(self._requests.values(), key=lambda r: r.firstSeen))

    def add(self, peer: PeerIdentity, source: str, instance: str) -> KeyRequest:
        """
        The waiting request of C{peer}'s key, made now if there is none, and
        announced to the owners.

        @raise KeyRequestRefused: if a cap is reached.
        """
        request = self._requests.get(peer.fingerprint)
        if request is not None:
            return request
        host = sourceHost(source)
        try:
            checkPendingCaps(
                host,
                sum(1 for r in self._requests.values() if sourceHost(r.source) == host),
                len(self._requests),
                self.maxPendingPerSource,
                self.maxPending,
                "key requests",
            )
        except PendingFull as e:
            raise self._refused(peer, source, str(e)) from None
        now = self.clock.seconds()
        request = KeyRequest(
            newRequestId(), peer, source, instance, now, now + self.ttl
        )
        request.timer = self.clock.callLater(self.ttl, self._lapse, request)
        self._requests[peer.fingerprint] = request
        self.log.info(
            "dwtrust: {peer_name} {fingerprint} from {source} asks for"
            " {service}'s key (request {request_id}, instance {instance})",
            event="dwtrust.key_request.received",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
            service=self.serviceName,
            request_id=request.requestId,
            instance=instance,
        )
        self._announce(
            "key_requested",
            request,
            f"{peer.name} asks for {self.serviceName}'s private key, to serve"
            f" as it (instance {instance})",
        )
        return request

    def wait(self, request: KeyRequest) -> Deferred[str]:
        """
        Fires with the releasing owner's fingerprint, or fails with
        L{KeyRequestRefused}.
        """
        if self._requests.get(request.peer.fingerprint) is not request:
            return fail(KeyRequestRefused("this key request is no longer waiting"))
        waiting: Deferred[str] = Deferred()
        request.waiting.append(waiting)
        return waiting

    def withdraw(
        self, request: KeyRequest, waiting: Deferred[str] | None = None
    ) -> None:
        """
        The router that made C{request} went away (and stopped C{waiting},
        if it waited): if nobody else waits on it, it is dropped and nothing
        is released.
        """
        request.waiting = [
            w for w in request.waiting if not w.called and w is not waiting
        ]
        if (
            request.waiting
            or self._requests.get(request.peer.fingerprint) is not request
        ):
            return
        self._end(request)
        self.log.info(
            "dwtrust: {peer_name} {fingerprint} went away; its key request"
            " {request_id} is withdrawn, nothing was released",
            event="dwtrust.key_request.withdrawn",
            peer_name=request.peer.name,
            fingerprint=request.peer.fingerprint,
            request_id=request.requestId,
        )
        self._announce("key_request_withdrawn", request, "the router disconnected")

    def decide(self, decision: SignedDecision) -> KeyRequest:
        """
        Apply an owner's verified C{release} or C{withhold} decision to the
        waiting request of the key it names.

        @raise KeyRequestRefused: if no request of that key is waiting, or
            the decision predates it.
        """
        request = self._requests.get(decision.fingerprint)
        if request is None:
            raise KeyRequestRefused(
                f"no key request from {decision.fingerprint} is waiting"
            )
        if decision.decidedAt < request.firstSeen - RELEASE_SKEW:
            raise KeyRequestRefused(
                "the decision was signed before this key request was made"
            )
        self._end(request)
        waiting, request.waiting = request.waiting, []
        released = decision.state == "release"
        done, toward = ("released", "to") if released else ("withheld", "from")
        self.log.info(
            "dwtrust: owner {signer} {done} {service}'s key {toward} {peer_name}"
            " {fingerprint} (request {request_id}): {reason}",
            event="dwtrust.key_request." + done,
            done=done,
            toward=toward,
            signer=decision.signer,
            service=self.serviceName,
            peer_name=request.peer.name,
            fingerprint=request.peer.fingerprint,
            request_id=request.requestId,
            reason=decision.reason,
        )
        for w in waiting:
            if released:
                w.callback(decision.signer)
            else:
                w.errback(
                    KeyRequestRefused(
                        f"an owner withheld the key: {decision.reason or 'no reason'}"
                    )
                )
        self._announce(
            "key_" + done,
            request,
            decision.reason,
            state=decision.state,
            decidedBy=decision.signer,
        )
        return request

    def _lapse(self, request: KeyRequest) -> None:
        request.timer = None
        if self._requests.get(request.peer.fingerprint) is not request:
            return
        self._end(request)
        self.log.info(
            "dwtrust: key request {request_id} from {peer_name} {fingerprint}"
            " lapsed without an answer; nothing was released",
            event="dwtrust.key_request.expired",
            request_id=request.requestId,
            peer_name=request.peer.name,
            fingerprint=request.peer.fingerprint,
        )
        waiting, request.waiting = request.waiting, []
        for w in waiting:
            w.errback(KeyRequestRefused("the key request lapsed without an answer"))
        self._announce("key_request_expired", request, "no owner answered in time")

    def _end(self, request: KeyRequest) -> None:
        del self._requests[request.peer.fingerprint]
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None

    def _refused(self, peer: PeerIdentity, source: str, why: str) -> KeyRequestRefused:
        self.log.warn(
            "dwtrust: REFUSED a key request from {peer_name} {fingerprint} at"
            " {source}: {reason}",
            event="dwtrust.key_request.refused",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
            reason=why,
        )
        return KeyRequestRefused(why)

    def _announce(
        self, kind: str, request: KeyRequest, reason: str, **details: Any
    ) -> None:
        self.bus.publish(
            ControlMessage.about(
                kind,
                self.serviceName,
                request.peer,
                source=request.source,
                requestId=request.requestId,
                firstSeen=request.firstSeen,
                reason=reason,
                **details,
            )
        )


def keyRequestEntry(request: KeyRequest) -> dict[str, Any]:
    """
    A waiting key request, as a L{dwtrust.control.ListPending} entry of kind
    C{key_request}.
    """
    peer = request.peer
    return {
        "kind": "key_request",
        "id": request.requestId,
        "fingerprint": peer.fingerprint,
        "org": peer.org,
        "service": peer.service,
        "algorithm": peer.algorithm,
        "publicKey": peer.publicKey.openssh(peer.name),
        "source": request.source,
        "instance": request.instance,
        "firstSeen": request.firstSeen,
        "lastSeen": request.firstSeen,
        "attempts": 1,
        "expires": request.expires,
        "knownKeys": [],
        "knownKeysOmitted": 0,
    }


class Provisioning:
    """
    What a running instance needs to provision others: its identity, its
    store, the join tokens it issued and the key requests waiting.
    """

    def __init__(
        self,
        identity: Identity,
        store: ITrustStore,
        bus: ControlBus,
        clock: IReactorTime,
        requestTTL: float = DEFAULT_REQUEST_TTL,
        maxPending: int = DEFAULT_MAX_PENDING,
        maxPendingPerSource: int = DEFAULT_MAX_PENDING_PER_SOURCE,
        owners: Sequence[PeerIdentity] = (),
        now: Callable[[], float] = time.time,
        decisions: Decisions | None = None,
    ) -> None:
        """
        @param owners: owners given to this instance outside its store (the
            daemon's C{--owner}): what it hands on includes registrations of
            them, signed with the service's key.
        @param decisions: the service's decisions: what it hands on is the
            decision in force about each key (not an older one a rolled-back
            store may show).  By default, the store's newest.
        """
        self.identity = identity
        self.store = store
        self.decisions = decisions
        self.bus = bus
        self.owners = list(owners)
        self._now = now
        self.tokens = JoinTokens(identity.fingerprint, now)
        self.keyRequests = KeyRequests(
            identity.name, bus, clock, requestTTL, maxPending, maxPendingPerSource
        )

    def locator(self, peer: PeerIdentity, source: str) -> ProvisioningLocator:
        """
        The commands a key that is not an owner may use, on one connection.
        """
        return ProvisioningLocator(self, peer, source)

    async def kit(self) -> tuple[dict[str, Any], list[bytes]]:
        """
        The answer to L{Join} and L{CollectKey} (the service's identity, its
        owners' registrations and how many signed decisions follow), and
        those decisions, encoded, for L{ServiceRecords} to page through.
        """
        owners = await self.store.owners()
        registered = set()
        for encoded in owners:
            with contextlib.suppress(DecisionError):
                registered.add(SignedDecision.decode(encoded).fingerprint)
        owners += [
            registerOwner(self.identity, owner, self._now()).encode()
            for owner in self.owners
            if owner.fingerprint not in registered
        ]
        decisions = []
        for record in await self.store.decided():
            if self.decisions is None:
                if record.decision:
                    decisions.append(record.decision)
                continue
            inForce = await self.decisions.current(record)
            if inForce is not None:
                decisions.append(inForce.encode())
        identity = self.identity
        answer = {
            "org": identity.org,
            "service": identity.service,
            "privateKey": identity.privateKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
            "owners": owners,
            "records": len(decisions),
        }
        return answer, decisions


def recordsPage(decisions: list[bytes], offset: int) -> dict[str, Any]:
    """
    The L{ServiceRecords} answer: a page of C{decisions} from C{offset}, as
    many as fit in one AMP value, and at least one if any are left.
    """
    page: list[bytes] = []
    size = 0
    for index in range(max(offset, 0), len(decisions)):
        decision = decisions[index]
        # ListOf(String) spends two bytes of length on each.
        if page and size + len(decision) + 2 > PAGE_BYTES:
            break
        page.append(decision)
        size += len(decision) + 2
    return {"decisions": page, "total": len(decisions)}


class ProvisioningLocator(amp.CommandLocator):
    """
    The provisioning commands, for one connection of a key that is not an
    owner: L{Join}, L{RequestKey}, L{CollectKey} and, once one of those
    succeeded, L{ServiceRecords}.
    """

    log = Logger()

    def __init__(
        self, provisioning: Provisioning, peer: PeerIdentity, source: str
    ) -> None:
        self.provisioning = provisioning
        self.peer = peer
        self.source = source
        # The decisions a join or a release entitled this connection to,
        # read once: ServiceRecords pages through them.
        self._decisions: list[bytes] | None = None
        self._request: KeyRequest | None = None
        self._waiting: Deferred[str] | None = None

    def connectionLost(self) -> None:
        request, self._request = self._request, None
        waiting, self._waiting = self._waiting, None
        if request is not None:
            self.provisioning.keyRequests.withdraw(request, waiting)
        if waiting is not None:
            # An answer nobody will collect now is no error.
            waiting.addErrback(lambda _: None)

    @Join.responder
    def join(
        self, tokenId: str, proof: bytes, instance: str
    ) -> Deferred[dict[str, Any]]:
        tokens = self.provisioning.tokens
        try:
            validateName("instance", instance)
            issuedBy = tokens.redeem(tokenId, proof, self.peer.fingerprint)
        except (JoinRefused, IdentityError) as e:
            self.log.warn(
                "dwtrust: REFUSED a join from {fingerprint} at {source}"
                " (instance {instance}): {reason}",
                event="dwtrust.join.refused",
                fingerprint=self.peer.fingerprint,
                source=self.source,
                # The peer's own words: escaped, so they cannot forge a line.
                instance=_escaped(instance[:80]),
                token_id=_escaped(tokenId[:8]),
                reason=str(e),
            )
            if isinstance(e, JoinReused):
                self._reused(tokenId, e.usedBy)
            return fail(JoinRefused(str(e)))
        self.log.info(
            "dwtrust: instance {instance} at {source} joined {service} with a"
            " join token issued by {issued_by}; it now holds the service's key",
            event="dwtrust.join.cloned",
            instance=instance,
            source=self.source,
            service=self.provisioning.identity.name,
            fingerprint=self.peer.fingerprint,
            token_id=tokenId[:8],
            issued_by=issuedBy,
        )
        return self._answer(self._handOver())

    def _reused(self, tokenId: str, usedBy: str) -> None:
        """
        Tell the owners that a used join token came back: one of the two
        that presented it was not meant to have it.
        """
        reason = (
            f"join token {tokenId[:8]} was presented again by {self.peer.fingerprint}"
            f" at {self.source} after {usedBy} redeemed it: the token may have"
            " leaked; check that the instance holding the service's key is"
            " yours"
        )
        self.log.warn(
            "dwtrust: a used join token came back from {fingerprint} at"
            " {source}: {reason}",
            event="dwtrust.join.reused",
            fingerprint=self.peer.fingerprint,
            source=self.source,
            token_id=tokenId[:8],
            used_by=usedBy,
            reason=reason,
        )
        self.provisioning.bus.publish(
            ControlMessage.about(
                "join_token_reused",
                self.provisioning.identity.name,
                self.peer,
                source=self.source,
                reason=reason,
            )
        )

    async def _handOver(self) -> dict[str, Any]:
        """
        The service's identity and owners; its decisions are kept for
        L{ServiceRecords}.
        """
        answer, self._decisions = await self.provisioning.kit()
        return answer

    def _answer(self, answering: Any) -> Deferred[dict[str, Any]]:
        """
        Run C{answering}; a failure that is not a typed refusal (the store
        failed, say) is logged in one line and answered as L{ControlFailed}.
        """

        def failed(failure: Failure) -> Failure:
            if failure.check(JoinRefused, KeyRequestRefused):
                return failure
            self.log.warn(
                "dwtrust: a provisioning request from {fingerprint} failed: {error}",
                event="dwtrust.provisioning.failed",
                fingerprint=self.peer.fingerprint,
                error=failure.getErrorMessage(),
            )
            return Failure(
                ControlFailed(
                    f"the service could not answer: {failure.getErrorMessage()}"
                )
            )

        return Deferred.fromCoroutine(answering).addErrback(failed)

    @RequestKey.responder
    def requestKey(self, instance: str) -> dict[str, Any]:
        try:
            validateName("instance", instance)
        except IdentityError as e:
            raise KeyRequestRefused(str(e)) from None
        if self._request is not None:
            raise KeyRequestRefused("this connection already made a key request")
        requests = self.provisioning.keyRequests
        self._request = requests.add(self.peer, self.source, instance)
        # Wait from now on, so that an answer given before CollectKey is kept.
        self._waiting = requests.wait(self._request)
        return {"requestId": self._request.requestId, "expires": self._request.expires}

    @CollectKey.responder
    def collectKey(self) -> Deferred[dict[str, Any]]:
        request, waiting = self._request, self._waiting
        if request is None or waiting is None:
            return fail(KeyRequestRefused("make a key request first"))

        async def collect() -> dict[str, Any]:
            assert request is not None and waiting is not None
            try:
                signer = await waiting
            finally:
                self._request = self._waiting = None
            self.log.info(
                "dwtrust: delivered {service}'s key to {peer_name} {fingerprint}"
                " at {source} (request {request_id}, released by {signer})",
                event="dwtrust.key_request.delivered",
                service=self.provisioning.identity.name,
                peer_name=self.peer.name,
                fingerprint=self.peer.fingerprint,
                source=self.source,
                request_id=request.requestId,
                signer=signer,
            )
            return await self._handOver()

        return self._answer(collect())

    @ServiceRecords.responder
    def serviceRecords(self, offset: int) -> Deferred[dict[str, Any]]:
        if self._decisions is None:
            return fail(
                KeyRequestRefused("the service's records follow a join or a release")
            )
        return succeed(recordsPage(self._decisions, offset))

    # An owner's commands, from a key that is not an owner's: a clear refusal
    # rather than AMP's "unhandled command".

    def _notAnOwner(self, **arguments: object) -> dict[str, Any]:
        self.log.warn(
            "dwtrust: REFUSED {peer_name} {fingerprint} from {source} on the"
            " control channel: not a registered owner (an owner's command)",
            event="dwtrust.control.refused",
            peer_name=self.peer.name,
            fingerprint=self.peer.fingerprint,
            source=self.source,
        )
        raise NotAnOwner(
            f"{self.peer.fingerprint} is not a registered owner of"
            f" {self.provisioning.identity.name}"
        )

    ListPending.responder(_notAnOwner)
    ListPeers.responder(_notAnOwner)
    Decide.responder(_notAnOwner)
    Watch.responder(_notAnOwner)
    IssueJoinToken.responder(_notAnOwner)
