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

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
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

#: The most bytes of one AMP message (box) the control channel takes: one
#: value at AMP's own limit (64 KiB) with its keys, and room to spare.  The
#: largest message an owner's client sends (a signed decision) is a few KiB.
DEFAULT_MAX_MESSAGE = 128 * 1024
#: The most fields (key and value pairs) of one message.  The largest
#: command (Join) has five, with AMP's own C{_command} and C{_ask}.
DEFAULT_MAX_FIELDS = 16
#: Seconds a connection that is not an owner's may stay silent, when no
#: answer to it is under way, before it is closed.
DEFAULT_IDLE_TIMEOUT = 30.0
#: Control connections at once of one key that is not an owner's.
DEFAULT_MAX_PER_KEY = 4
#: Control connections at once of all the keys that are not owners'.
DEFAULT_MAX_CONNECTIONS = 64


@frozen
class ControlLimits:
    """
    What one control connection may make the service hold.  Every message
    is bounded, from owners too; the idle timeout and the connection caps
    apply to keys that are not owners' (new instances, service routers,
    strangers): owners are never counted against them.

    @ivar maxMessage: the most bytes of one message (its keys and values,
        with their length prefixes).
    @ivar maxFields: the most fields of one message.
    @ivar idleTimeout: seconds a non-owner's connection may stay silent
        while no answer to it is under way.
    @ivar maxPerKey: a non-owner key's connections at once.
    @ivar maxConnections: all non-owners' connections at once.
    """

    maxMessage: int = DEFAULT_MAX_MESSAGE
    maxFields: int = DEFAULT_MAX_FIELDS
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT
    maxPerKey: int = DEFAULT_MAX_PER_KEY
    maxConnections: int = DEFAULT_MAX_CONNECTIONS


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

    Every message is bounded (L{ControlLimits}: its bytes and its fields),
    and a key that is not an owner's is held to the idle timeout, to at
    most L{MAX_UNANSWERED} commands under way, and to the connection caps
    its factory counts (L{NonOwnerConnections}).  Past a limit, the
    connection is closed and one warning logged.

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
        limits: ControlLimits | None = None,
        clock: IReactorTime | None = None,
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
        self.limits = limits if limits is not None else ControlLimits()
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self._clock: IReactorTime = clock
        self._paused = False
        self._unwatch: Callable[[], None] | None = None
        #: The key of a connection that is not an owner's, once admitted.
        self._stranger: PeerIdentity | None = None
        self._source = ""
        self._boxBytes = 0
        self._boxFields = 0
        self._refused = False
        #: Commands of this connection being answered.
        self._busy = 0
        self._idle: IDelayedCall | None = None

    def connectionMade(self) -> None:
        peer = getattr(self.transport, "peer", None)
        if (
            isinstance(peer, PeerIdentity)
            and peer.fingerprint not in self.owners
            and self.provisioning is not None
            and self.transport is not None
        ):
            self._source = _describe(self.transport.getPeer())
            connections = getattr(self.factory, "connections", None)
            if isinstance(connections, NonOwnerConnections):
                refusal = connections.admit(peer.fingerprint)
                if refusal is not None:
                    self._refuseConnection(
                        "control_connections",
                        refusal,
                        fingerprint=peer.fingerprint,
                    )
                    return
                self._counted = connections
            self._stranger = peer
            self.locator = self.provisioning.locator(peer, self._source)
            amp.AMP.connectionMade(self)
            self._idleLater()
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
        self._cancelIdle()
        counted, self._counted = self._counted, None
        if counted is not None and self._stranger is not None:
            counted.release(self._stranger.fingerprint)
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.locator is not self:
            self.locator.connectionLost()
        amp.AMP.connectionLost(self, reason)

    # Limits

    _counted: NonOwnerConnections | None = None

    def _refuseConnection(self, kind: str, reason: str, **fields: Any) -> None:
        """
        Close this connection for a limit it reached: one warning, no
        traceback, and nothing more read from it.
        """
        if self._refused:
            return
        self._refused = True
        # Stop parsing what is buffered already, and drop the box so far.
        self.paused = True
        self._currentBox = None
        self._cancelIdle()
        peer = getattr(self.transport, "peer", None)
        self.log.warn(
            "dwtrust: REFUSED a control connection from {fingerprint} at"
            " {source}: {reason}",
            event=f"dwtrust.control.{kind}",
            fingerprint=fields.pop("fingerprint", getattr(peer, "fingerprint", None)),
            source=self._source
            or (_describe(self.transport.getPeer()) if self.transport else ""),
            reason=reason,
            **fields,
        )
        transport = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None:
                abort()
            else:
                transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        amp.AMP.dataReceived(self, data)

    def proto_init(self, string: bytes) -> str:
        self._boxBytes = 0
        self._boxFields = 0
        return str(amp.AMP.proto_init(self, string))

    def proto_key(self, string: bytes) -> str:
        if self._refused:
            return "init"
        if string:
            self._boxFields += 1
            self._boxBytes += 2 + len(string)
            if self._boxFields > self.limits.maxFields:
                self._refuseConnection(
                    "message_refused",
                    f"a message with more than {self.limits.maxFields} fields",
                    limit="fields",
                )
                return "init"
        return str(amp.AMP.proto_key(self, string))

    def proto_value(self, string: bytes) -> str:
        if self._refused:
            return "init"
        self._boxBytes += 2 + len(string)
        if self._boxBytes > self.limits.maxMessage:
            self._refuseConnection(
                "message_refused",
                f"a message of more than {self.limits.maxMessage} bytes",
                limit="bytes",
            )
            return "init"
        return str(amp.AMP.proto_value(self, string))

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self._refused:
            return
        if not any(k in box for k in (b"_answer", b"_error", b"_command")):
            self._refuseConnection(
                "message_refused", "a message that is not an AMP command"
            )
            return
        amp.AMP.ampBoxReceived(self, box)
        self._idleLater()

    def dispatchCommand(self, box: amp.AmpBox) -> Deferred[Any]:
        if self._stranger is not None and self._busy >= MAX_UNANSWERED:
            self._refuseConnection(
                "message_refused",
                f"more than {MAX_UNANSWERED} commands at once",
                limit="commands",
            )
            return Deferred()
        self._busy += 1

        def answered(result: object) -> object:
            self._busy -= 1
            self._idleLater()
            return result

        dispatching: Deferred[Any] = amp.AMP.dispatchCommand(self, box)
        return dispatching.addBoth(answered)

    def _cancelIdle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def _idleLater(self) -> None:
        """
        (Re)start the idle timeout of a connection that is not an owner's,
        unless an answer to it is under way.
        """
        self._cancelIdle()
        if (
            self._stranger is None
            or self._refused
            or self._busy
            or self.transport is None
        ):
            return
        self._idle = self._clock.callLater(self.limits.idleTimeout, self._idleOut)

    def _idleOut(self) -> None:
        self._idle = None
        self._refuseConnection(
            "idle_timeout",
            f"silent for {self.limits.idleTimeout:g} s",
            limit="idle",
        )

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


#: Commands of a non-owner's connection under way at once, at most.
MAX_UNANSWERED = 8


class NonOwnerConnections:
    """
    The control connections of keys that are not owners', counted per key
    and in all, against L{ControlLimits}.
    """

    def __init__(self, limits: ControlLimits) -> None:
        self.limits = limits
        self.perKey: dict[str, int] = {}
        self.total = 0

    def admit(self, fingerprint: str) -> str | None:
        """
        Count one more connection of C{fingerprint}, or say why not.
        """
        held = self.perKey.get(fingerprint, 0)
        if held >= self.limits.maxPerKey:
            return (
                f"this key already has {held} control connections"
                f" (at most {self.limits.maxPerKey} for a key that is not an"
                " owner's)"
            )
        if self.total >= self.limits.maxConnections:
            return (
                f"{self.total} control connections of keys that are not"
                f" owners' are open (at most {self.limits.maxConnections})"
            )
        self.perKey[fingerprint] = held + 1
        self.total += 1
        return None

    def release(self, fingerprint: str) -> None:
        held = self.perKey.get(fingerprint, 0) - 1
        if held > 0:
            self.perKey[fingerprint] = held
        else:
            self.perKey.pop(fingerprint, None)
        self.total = max(self.total - 1, 0)


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
        limits: ControlLimits | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.decisions = decisions
        self.bus = bus
        self.provisioning = provisioning
        self.limits = limits if limits is not None else ControlLimits()
        self.clock = clock
        self.connections = NonOwnerConnections(self.limits)

    def buildProtocol(self, addr: IAddress | None) -> ControlServer:
        protocol = ControlServer(
            self.decisions, self.bus, self.provisioning, self.limits, self.clock
        )
        protocol.factory = self
        return protocol


def controlFactory(
    decisions: Decisions,
    bus: ControlBus,
    provisioning: Provisioning | None = None,
    limits: ControlLimits | None = None,
    clock: IReactorTime | None = None,
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
    @param limits: what one connection may make the service hold.
    """
    return ControlFactory(decisions, bus, provisioning, limits, clock)
