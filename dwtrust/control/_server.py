"""
The service's end of the control channel.

The channel is a dwtrust service like any other, with one policy:
L{OwnersOnlyPolicy} lets in the registered owners' keys and nobody else.
Over it, L{ControlServer} answers the commands of L{dwtrust.control._protocol}
from the trust store and the control bus, and applies the decisions owners
sign, once it has checked their signatures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from .._authority import DecisionRejected, Decisions, DecisionStoreFailed
from .._bus import ControlBus, ControlMessage
from .._decision import KEY_RELEASE_STATES, DecisionError, SignedDecision, Signers
from .._identity import IdentityError, PeerIdentity, PublicKey
from .._machine import Refusal
from .._policy import ITrustPolicy
from .._protocol import _describe
from .._wire import ErrorCode
from ..provisioning._commands import IssueJoinToken, KeyRequestRefused
from ..provisioning._server import KeyRequest, Provisioning, keyRequestEntry
from ..provisioning._tokens import JoinError
from ..store import KeyRecord, KeyState, StoreUnavailable
from ._protocol import (
    MAX_KNOWN_KEYS,
    PAGE_ENTRIES,
    ControlFailed,
    Decide,
    DecisionRefused,
    ListPeers,
    ListPending,
    Notify,
    Watch,
    dumps,
    encodeMessage,
    matchesKey,
    page,
)


@implementer(ITrustPolicy)
class OwnersOnlyPolicy:
    """
    The control channel's policy: a registered owner's key goes on, and every
    other key is refused with C{denied}.  Nothing is stored and nobody is
    asked: an unknown key on the control channel is not a request.

    @ivar owners: the registered owners' keys.
    """

    log = Logger()

    def __init__(self, owners: Signers) -> None:
        self.owners = owners

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        if peer.fingerprint in self.owners:
            return succeed(None)
        self.log.warn(
            "dwtrust: REFUSED {peer_name} {fingerprint} from {source} on the"
            " control channel: not a registered owner",
            event="dwtrust.control.refused",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
        )
        return fail(
            Refusal(
                ErrorCode.denied,
                f"{peer.fingerprint} is not a registered owner of this service",
            )
        )


@implementer(ITrustPolicy)
class ControlPolicy:
    """
    The daemon's control channel policy: every authenticated key goes on.
    A registered owner's gets the owners' commands; any other key (a new
    instance with a join token, a service router asking for the key) gets
    the provisioning commands only, which release nothing without an
    owner's say (see L{dwtrust.provisioning}).  Nothing is stored.

    Use L{OwnersOnlyPolicy} for a control channel that refuses other keys at
    the handshake.
    """

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        return succeed(None)


def openSSHLine(record: KeyRecord) -> str:
    """
    The OpenSSH public-key line of C{record}'s key, commented with the name it
    claimed; empty if the stored key does not parse.
    """
    try:
        key = PublicKey.fromWire(record.algorithm, record.publicKey)
    except IdentityError:
        return ""
    return key.openssh(f"{record.org}/{record.service}")


def peerEntry(record: KeyRecord) -> dict[str, Any]:
    """
    A key with a decision, as L{ListPeers} describes it.
    """
    return {
        "fingerprint": record.fingerprint,
        "org": record.org,
        "service": record.service,
        "algorithm": record.algorithm,
        "publicKey": openSSHLine(record),
        "state": record.state.value,
        "decidedBy": record.decidedBy,
        "firstSeen": record.firstSeen,
        "lastSeen": record.lastSeen,
        "attempts": record.attempts,
        "source": record.source,
        "sentBy": record.sentBy,
    }


def pendingEntry(record: KeyRecord, known: Sequence[KeyRecord]) -> dict[str, Any]:
    """
    A pending request, as L{ListPending} describes it.

    @param known: the records of every key of the same org/service (this one's
        included, or not).
    """
    others = sorted(
        (k for k in known if k.fingerprint != record.fingerprint),
        key=lambda k: (k.state is not KeyState.approved, k.firstSeen),
    )
    return {
        "id": record.requestId,
        "fingerprint": record.fingerprint,
        "org": record.org,
        "service": record.service,
        "algorithm": record.algorithm,
        "publicKey": openSSHLine(record),
        "source": record.source,
        "firstSeen": record.firstSeen,
        "lastSeen": record.lastSeen,
        "attempts": record.attempts,
        "expires": record.expires,
        "knownKeys": [
            {"fingerprint": k.fingerprint, "state": k.state.value}
            for k in others[:MAX_KNOWN_KEYS]
        ],
        "knownKeysOmitted": max(len(others) - MAX_KNOWN_KEYS, 0),
    }


class _Listed(Protocol):
    @property
    def requestId(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...


_T = TypeVar("_T", bound=_Listed)


def _chosen(
    records: list[_T], offset: int | None, prefix: str | None
) -> tuple[list[_T], int, int]:
    """
    The records a page may hold: those C{prefix} matches, from C{offset} on.

    @return: those records, how many match in all, and the offset.
    """
    if prefix:
        records = [r for r in records if matchesKey(prefix, r.requestId, r.fingerprint)]
    start = max(offset or 0, 0)
    return records[start : start + PAGE_ENTRIES], len(records), start


@implementer(IPushProducer)
class ControlServer(amp.AMP):
    """
    One owner's control connection, as the service sees it.

    It must be reached through an L{Authenticator} whose inbound policy is
    L{OwnersOnlyPolicy}; as a second line of defence, it drops any connection
    whose authenticated peer is not a registered owner.

    A key that is not an owner's gets the provisioning commands only, if the
    service provisions (C{provisioning}); otherwise it is dropped.

    While it watches, it is its transport's producer: when the owner reads
    too slowly for the messages to flow, they are counted, not buffered, and
    the owner is told how many were dropped once the connection flows again.
    A slow owner therefore costs the service a bounded amount of memory.

    @ivar owner: the connected owner's identity.
    @ivar dropped: how many messages were dropped since the connection
        stalled.
    """

    log = Logger()

    def __init__(
        self,
        decisions: Decisions,
        bus: ControlBus,
        provisioning: Provisioning | None = None,
    ) -> None:
        amp.AMP.__init__(self)
        self.provisioning = provisioning
        self.decisions = decisions
        self.store = decisions.store
        self.bus = bus
        self.owners = decisions.owners
        self.serviceName = decisions.serviceName
        self.owner: PeerIdentity | None = None
        self.dropped = 0
        self._paused = False
        self._unwatch: Callable[[], None] | None = None

    def connectionMade(self) -> None:
        peer = getattr(self.transport, "peer", None)
        if (
            isinstance(peer, PeerIdentity)
            and peer.fingerprint not in self.owners
            and self.provisioning is not None
            and self.transport is not None
        ):
            self.locator = self.provisioning.locator(
                peer, _describe(self.transport.getPeer())
            )
            amp.AMP.connectionMade(self)
            return
        if not isinstance(peer, PeerIdentity) or peer.fingerprint not in self.owners:
            self.log.error(
                "dwtrust: a control connection from {peer} is not an"
                " authenticated owner; dropped (is the control endpoint wrapped"
                " with OwnersOnlyPolicy?)",
                event="dwtrust.control.unauthenticated",
                peer=repr(peer),
            )
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self.owner = peer
        amp.AMP.connectionMade(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.locator is not self:
            self.locator.connectionLost()
        amp.AMP.connectionLost(self, reason)

    # Lists

    @ListPending.responder
    def listPending(
        self, offset: int | None = None, prefix: str | None = None
    ) -> Deferred[dict[str, str]]:
        return self._answer(self._listPending(offset, prefix))

    async def _listPending(self, offset: int | None, prefix: str | None) -> str:
        pending: list[KeyRecord | KeyRequest] = [*await self.store.pending()]
        if self.provisioning is not None:
            pending.extend(self.provisioning.keyRequests)
        chosen, total, start = _chosen(pending, offset, prefix)
        known: dict[tuple[str, str], list[KeyRecord]] = {}
        entries = []
        for item in chosen:
            if not isinstance(item, KeyRecord):
                entries.append(keyRequestEntry(item))
                continue
            name = (item.org, item.service)
            if name not in known:
                known[name] = await self.store.keysFor(*name)
            entry = pendingEntry(item, known[name])
            entry["sequence"] = await self.decisions.newestSequence(
                item.fingerprint, item
            )
            entries.append(entry)
        return page(entries, start, total)

    @ListPeers.responder
    def listPeers(
        self, offset: int | None = None, prefix: str | None = None
    ) -> Deferred[dict[str, str]]:
        return self._answer(self._listPeers(offset, prefix))

    async def _listPeers(self, offset: int | None, prefix: str | None) -> str:
        records, total, start = _chosen(await self.store.decided(), offset, prefix)
        entries = []
        for record in records:
            entry = peerEntry(record)
            entry["sequence"] = await self.decisions.newestSequence(
                record.fingerprint, record
            )
            entries.append(entry)
        return page(entries, start, total)

    def _answer(self, listing: Any) -> Deferred[dict[str, str]]:
        def failed(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                # An outage of a shared store: one line, no traceback.
                self.log.warn(
                    "dwtrust: a control request failed: {reason}",
                    event="dwtrust.control",
                    reason=failure.getErrorMessage(),
                )
            else:
                self.log.failure(
                    "dwtrust: a control request failed",
                    failure,
                    event="dwtrust.control",
                )
            return Failure(
                ControlFailed(
                    f"the service could not answer: {failure.getErrorMessage()}"
                )
            )

        answering: Deferred[str] = Deferred.fromCoroutine(listing)
        return answering.addCallbacks(lambda text: {"page": text}, failed)

    # Decisions

    @Decide.responder
    def decide(self, decision: bytes) -> Deferred[dict[str, str]]:
        return Deferred.fromCoroutine(self._decide(decision))

    async def _decide(self, encoded: bytes) -> dict[str, str]:
        if self.owner is None:
            raise self._refuse("only a registered owner decides", encoded)
        try:
            decision = SignedDecision.decode(encoded)
        except DecisionError as e:
            raise self._refuse(str(e), encoded) from None
        if decision.state in KEY_RELEASE_STATES:
            return self._answerKeyRequest(decision, encoded)
        try:
            applied = await self.decisions.apply(encoded, self.owner)
        except DecisionRejected as e:
            raise self._refuse(str(e), encoded) from None
        except DecisionStoreFailed as e:
            raise self._failed(e, "nothing changed") from None
        except Exception as e:
            raise self._failed(e, "nothing changed") from None
        self.log.info(
            "dwtrust: owner {signer} {state} {peer_name} {fingerprint}"
            " ({reason}), decision {sequence}, sent by {owner}{unstored}",
            event="dwtrust.control.decision",
            signer=decision.signer,
            state=decision.state,
            peer_name=f"{decision.org}/{decision.subjectService}",
            fingerprint=decision.fingerprint,
            reason=decision.reason,
            sequence=decision.sequence,
            owner=self.owner.fingerprint,
            stored=applied.stored,
            unstored=""
            if applied.stored
            else "; NOT STORED YET: " + applied.storeError,
        )
        if applied.record is not None:
            entry = peerEntry(applied.record)
        else:
            entry = {
                "fingerprint": decision.fingerprint,
                "org": decision.org,
                "service": decision.subjectService,
                "algorithm": decision.algorithm,
                "state": decision.state,
                "decidedBy": decision.signer,
            }
        entry["sequence"] = decision.sequence
        entry["sentBy"] = self.owner.fingerprint
        entry["stored"] = applied.stored
        if not applied.stored:
            entry["storeError"] = applied.storeError
        return {"peer": dumps(entry)}

    def _answerKeyRequest(
        self, decision: SignedDecision, encoded: bytes
    ) -> dict[str, str]:
        if self.provisioning is None:
            raise self._refuse(f"{decision.state!r} is not a decision", encoded)
        try:
            self.owners.verify(
                decision, self.serviceName, self.decisions.identity.fingerprint
            )
            decision.subject()
            request = self.provisioning.keyRequests.decide(decision)
        except (DecisionError, KeyRequestRefused) as e:
            raise self._refuse(str(e), encoded) from None
        entry = keyRequestEntry(request)
        entry["state"] = decision.state
        entry["decidedBy"] = decision.signer
        return {"peer": dumps(entry)}

    # Join tokens

    @IssueJoinToken.responder
    def issueJoinToken(self, ttl: float) -> dict[str, Any]:
        if self.provisioning is None or self.owner is None:
            raise JoinError("this service does not provision new instances")
        tokenId, secret, expires = self.provisioning.tokens.issue(
            ttl, self.owner.fingerprint
        )
        self.log.info(
            "dwtrust: owner {owner} took join token {token_id} for"
            " {service}, good for one new instance until {expires}",
            event="dwtrust.join.token_issued",
            owner=self.owner.fingerprint,
            token_id=tokenId[:8],
            service=self.serviceName,
            expires=expires,
        )
        return {"tokenId": tokenId, "secret": secret, "expires": expires}

    def _refuse(self, reason: str, encoded: bytes) -> DecisionRefused:
        self.log.warn(
            "dwtrust: REFUSED a decision from {owner}: {reason}",
            event="dwtrust.control.decision_refused",
            owner=self.owner.fingerprint if self.owner else None,
            reason=reason,
            size=len(encoded),
        )
        return DecisionRefused(reason)

    def _failed(self, error: Exception, outcome: str) -> ControlFailed:
        self.log.warn(
            "dwtrust: the trust store failed: {error}; {outcome}",
            event="dwtrust.control.store_failed",
            error=str(error) or type(error).__name__,
            outcome=outcome,
        )
        return ControlFailed(f"the trust store failed: {error}; {outcome}")

    # Watching

    @Watch.responder
    def watch(self) -> dict[str, str]:
        if self._unwatch is None and self.transport is not None:
            register = getattr(self.transport, "registerProducer", None)
            if register is not None:
                register(self, True)
            self._unwatch = self.bus.watch(self._notify)
        return {}

    def _notify(self, message: ControlMessage) -> None:
        if self.transport is None:
            return
        if self._paused:
            self.dropped += 1
            return
        amp.AMP.callRemote(self, Notify, message=encodeMessage(message))

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self._notify(
                ControlMessage(
                    "dropped",
                    self.serviceName,
                    "",
                    attempts=dropped,
                    reason=f"{dropped} control messages were dropped while this"
                    " connection was too slow to take them",
                )
            )

    def stopProducing(self) -> None:
        self._paused = True


class ControlFactory(Factory):
    """
    Builds L{ControlServer}s.
    """

    noisy = False

    def __init__(
        self,
        decisions: Decisions,
        bus: ControlBus,
        provisioning: Provisioning | None = None,
    ) -> None:
        self.decisions = decisions
        self.bus = bus
        self.provisioning = provisioning

    def buildProtocol(self, addr: IAddress | None) -> ControlServer:
        protocol = ControlServer(self.decisions, self.bus, self.provisioning)
        protocol.factory = self
        return protocol


def controlFactory(
    decisions: Decisions,
    bus: ControlBus,
    provisioning: Provisioning | None = None,
) -> IProtocolFactory:
    """
    The factory of a service's control channel, to wrap with an
    L{Authenticator} whose inbound policy is
    C{OwnersOnlyPolicy(decisions.owners)}:

        authenticator = Authenticator(
            identity, OwnersOnlyPolicy(decisions.owners), None, reactor)
        authenticator.serverEndpoint(inner).listen(controlFactory(decisions, bus))

    @param decisions: the service's decisions: owners' decisions sent over
        the channel are applied through L{Decisions.apply}, and only the
        owners among its keys may send them.
    @param provisioning: if given, owners may issue join tokens and answer
        key requests, and keys that are not owners' may use the provisioning
        commands (wrap with L{ControlPolicy} rather than L{OwnersOnlyPolicy}
        then).
    """
    return ControlFactory(decisions, bus, provisioning)
