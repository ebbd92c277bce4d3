"""
The one home of the rules about decisions: which decision about a key is in
force, and what happens when a new one is made.

- A decision counts only if it is signed by a key trusted to decide (the
  registered owners, or the service itself for its approvers), names this
  service by its name I{and} its key, and is filed at the place in the key's
  history that it signs (L{SignedDecision.sequence}).
- Trust never goes backwards: every instance remembers the newest decision it
  has seen about each key (L{NewestDecisions}, a file of its own), and a
  decision older than that is refused and reported as a rollback, whether it
  comes from the store, from another instance or over the control channel.
- A refusal (revoked, denied, blocked) takes effect in memory first: the key's
  sessions close and it is refused at once; then it is stored, and tried
  again until it is.  An approval is stored first, then acted on.

The trust policy (L{dwtrust._policy.ApprovalPolicy}) reads through
L{Decisions.current}; the control channel hands owners' decisions to
L{Decisions.apply}; the daemon hands other instances' changes to
L{Decisions.fromFleet}; approvers' decisions go through L{Decisions.decideFor}.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._bus import ControlBus, ControlMessage
from ._decision import STATES, DecisionError, SignedDecision, Signers
from ._identity import Identity, PeerIdentity
from ._machine import Refusal
from ._wire import ErrorCode
from .store import DecisionConflict, ITrustStore, KeyRecord, KeyState, StoreChange
from .store._newest import NewestDecisions

#: Seconds before a refusal that could not be stored is tried again, at
#: first; the wait doubles up to L{MAX_RETRY}.
FIRST_RETRY = 1.0
MAX_RETRY = 60.0
#: Stored decisions remembered as counting, at most (see L{Decisions.verify}).
MAX_COUNTED = 100_000
_log = Logger()


class _Session(Protocol):
    @property
    def transport(self) -> Any: ...


class DecisionRejected(Exception):
    """
    A decision was not applied: the message says why.  Nothing was stored.
    """


class DecisionStoreFailed(Exception):
    """
    An approval could not be stored, so it was not applied.
    """


@frozen
class Applied:
    """
    What L{Decisions.apply} did.

    @ivar decision: the decision applied.
    @ivar record: the key's record as stored, or L{None} if it could not be.
    @ivar stored: whether the store holds it now; a refusal that is not
        stored yet is in force all the same, and is being retried.
    @ivar storeError: why it is not stored, if it is not.
    """

    decision: SignedDecision
    record: KeyRecord | None
    stored: bool
    storeError: str = ""


def refusalState(state: str) -> bool:
    """
    Whether a decision in C{state} refuses the key.
    """
    return state in STATES and state != KeyState.approved.value


class Decisions:
    """
    The decisions in force for one service, and the making of new ones.

    @ivar owners: the registered owners' keys: the only keys whose decisions
        L{apply} accepts.  Shared with the control channel's admission rule.
    @ivar signers: the keys whose stored decisions count: the owners and the
        service itself.
    @ivar sessions: if set, gives the open sessions of a key, to be closed
        when the key is refused.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        store: ITrustStore,
        owners: Signers,
        newest: NewestDecisions,
        bus: ControlBus | None = None,
        now: Callable[[], float] = time.time,
        clock: IReactorTime | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.owners = owners
        self.signers = Signers(owners)
        self.signers.add(identity.publicKey)
        self.newest = newest
        self.bus = bus
        self.sessions: Callable[[str], Sequence[_Session]] | None = None
        self._now = now
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._clock: IReactorTime = clock
        #: Refusals in force but not stored yet, and their retries.
        self._unstored: dict[str, tuple[SignedDecision, IDelayedCall]] = {}
        #: Rollbacks already reported, so that each is reported once.
        self._reported: set[tuple[str, bytes]] = set()
        #: Stored decisions that counted, by (decision, key, place), with
        #: the signers' generation and whether this instance was carried
        #: over then: a known key's lookup does not decode it again.
        self._counted: dict[
            tuple[bytes, str, int], tuple[int, bool, SignedDecision]
        ] = {}

    @property
    def serviceName(self) -> str:
        return self.identity.name

    # Reading

    def verify(self, record: KeyRecord) -> SignedDecision | None:
        """
        The decision stored in C{record}, if it counts; L{None} (and a
        warning to the log and the owners) if it is there but does not.
        Its order against what this instance has seen is not checked here:
        see L{current}.
        """
        if not record.decision:
            if record.state is KeyState.pending:
                return None
            self._report(
                record,
                "forged_decision",
                f"the store says {record.state.value}, but no signed decision"
                " is behind it",
                "dwtrust: REFUSED a stored decision: {fingerprint} is {state} in"
                " the store, but {error}",
                error="no signed decision is behind it",
                state=record.state.value,
            )
            return None
        remembered = (record.decision, record.fingerprint, record.sequence)
        counted = self._counted.get(remembered)
        if (
            counted is not None
            and counted[0] == self.signers.generation
            and counted[1] == self.newest.carriedOver
        ):
            return counted[2]
        try:
            decision = SignedDecision.decode(record.decision)
            self._check(decision, self.signers)
            if decision.fingerprint != record.fingerprint:
                raise DecisionError("the decision is about another key")
            if decision.sequence != record.sequence:
                raise DecisionError(
                    f"it signs place {decision.sequence} in the key's history,"
                    f" but is filed at {record.sequence}"
                )
        except DecisionError as e:
            self._report(
                record,
                "forged_decision",
                f"the store says {record.state.value}, but {e}",
                "dwtrust: REFUSED a stored decision: {fingerprint} is {state} in"
                " the store, but {error}",
                error=str(e),
                state=record.state.value,
            )
            return None
        if len(self._counted) >= MAX_COUNTED:
            self._counted.clear()
        self._counted[remembered] = (
            self.signers.generation,
            self.newest.carriedOver,
            decision,
        )
        return decision

    def _check(self, decision: SignedDecision, signers: Signers) -> None:
        if decision.state not in STATES:
            raise DecisionError(f"{decision.state!r} is not a decision about a key")
        if decision.version == 1:
            if self.newest.carriedOver and not refusalState(decision.state):
                raise DecisionError(
                    "a version 1 approval counts for nothing once this"
                    " instance's decisions were carried over to version 2"
                )
            signers.verify(decision, self.serviceName, None)
        else:
            signers.verify(decision, self.serviceName, self.identity.fingerprint)
        decision.subject()

    def current(self, record: KeyRecord) -> Deferred[SignedDecision | None]:
        """
        The decision in force about C{record}'s key: the newer of the one
        stored (if it counts) and the one this instance remembers.  A stored
        one that is newer is remembered from now on; one that is older, or
        that differs at the same place in history, is a rollback: refused,
        logged and reported to the owners.
        """
        return self._current(record).addCallback(lambda found: found[0])

    def _current(
        self, record: KeyRecord
    ) -> Deferred[tuple[SignedDecision | None, bool]]:
        """
        Fires with the decision in force, and whether it is news to this
        instance: at once if this instance remembers the key's newest
        decision in memory (no coroutine: this is every known key's
        handshake).
        """
        stored = self.verify(record)
        return self.newest.get(record.fingerprint).addCallback(
            self._inForce, record, stored
        )

    def _inForce(
        self,
        remembered: SignedDecision | None,
        record: KeyRecord,
        stored: SignedDecision | None,
    ) -> tuple[SignedDecision | None, bool]:
        if remembered is None:
            if stored is not None:
                self.newest.remember(stored)
            return stored, stored is not None
        if stored is not None and stored.sequence > remembered.sequence:
            self.newest.remember(stored)
            return stored, True
        differs = stored is None or stored != remembered
        if differs and record.fingerprint not in self._unstored:
            self._rollback(record, stored, remembered)
        return remembered, False

    def _rollback(
        self,
        record: KeyRecord,
        stored: SignedDecision | None,
        remembered: SignedDecision,
    ) -> None:
        if stored is None:
            found = "no decision that counts"
        else:
            found = f"decision {stored.sequence} ({stored.state})"
        self._report(
            record,
            "rollback",
            f"the store holds {found}, but this instance has seen decision"
            f" {remembered.sequence} ({remembered.state}, signed by"
            f" {remembered.signer}); the older one is refused",
            "dwtrust: ROLLBACK REFUSED: {fingerprint}: the store holds {found},"
            " but this instance has seen decision {sequence} ({state})",
            found=found,
            sequence=remembered.sequence,
            state=remembered.state,
            once=(record.fingerprint, record.decision),
        )

    def _report(
        self,
        key: KeyRecord,
        kind: str,
        reason: str,
        format: str,
        once: tuple[str, bytes] | None = None,
        **fields: Any,
    ) -> None:
        if once is not None:
            if once in self._reported:
                return
            if len(self._reported) > 10_000:
                self._reported.clear()
            self._reported.add(once)
        self.log.warn(
            format, event=f"dwtrust.{kind}", fingerprint=key.fingerprint, **fields
        )
        if self.bus is not None:
            self.bus.publish(
                ControlMessage.about(
                    kind, self.serviceName, key, state=key.state.value, reason=reason
                )
            )

    async def newestSequence(self, fingerprint: str, record: KeyRecord | None) -> int:
        """
        The place in history of the newest decision about a key that this
        instance knows of, in the store (C{record}, the key's record) or in
        its own memory; 0 if none.  A new decision takes the next place.
        """
        remembered = await self.newest.get(fingerprint)
        return max(
            record.sequence if record is not None else 0,
            remembered.sequence if remembered is not None else 0,
            0,
        )

    # Making decisions

    async def decideFor(
        self, peer: PeerIdentity, state: KeyState, reason: str, source: str, by: str
    ) -> SignedDecision:
        """
        Sign with the service's own key, store and apply an approver's
        decision about C{peer}.

        @raise DecisionConflict: if another decision was stored meanwhile.
        """
        record = await self.store.lookup(peer.fingerprint)
        place = await self.newestSequence(peer.fingerprint, record)
        decision = SignedDecision.make(
            self.identity,
            self.serviceName,
            peer,
            state.value,
            self._now(),
            reason,
            self.identity.fingerprint,
            place + 1,
        )
        await self._store(decision, source, by, self.identity.fingerprint)
        self._applied(decision)
        return decision

    async def apply(self, encoded: bytes, sender: PeerIdentity) -> Applied:
        """
        Apply an owner's decision that came over the control channel.

        @raise DecisionRejected: if it does not count (malformed, not an
            owner's, for another service, older than the newest decision, or
            naming the key otherwise than the store does).
        @raise DecisionStoreFailed: if an approval could not be stored.
        """
        try:
            decision = SignedDecision.decode(encoded)
            if decision.version == 1:
                raise DecisionError(
                    "a version 1 decision names neither the service's key nor"
                    " its place in the key's history; sign a new one"
                )
            self._check(decision, self.owners)
            subject = decision.subject()
        except DecisionError as e:
            raise DecisionRejected(str(e)) from None
        existing = await self.store.lookup(decision.fingerprint)
        if existing is not None and (existing.org, existing.service) != (
            subject.org,
            subject.service,
        ):
            raise DecisionRejected(
                f"the decision names {subject.name}, but {subject.fingerprint}"
                f" is on record as {existing.org}/{existing.service}"
            )
        remembered = await self.newest.get(decision.fingerprint)
        newest = await self.newestSequence(decision.fingerprint, existing)
        if decision.sequence <= newest:
            if remembered == decision:
                raise DecisionRejected(
                    f"decision {decision.sequence} about {decision.fingerprint}"
                    " is in force already"
                )
            self.log.warn(
                "dwtrust: ROLLBACK REFUSED: {sender} sent decision {sequence}"
                " ({state}, signed by {signer}) about {fingerprint}, but the"
                " newest is {newest}",
                event="dwtrust.rollback",
                sender=sender.fingerprint,
                sequence=decision.sequence,
                state=decision.state,
                signer=decision.signer,
                fingerprint=decision.fingerprint,
                newest=newest,
            )
            raise DecisionRejected(
                f"decision {decision.sequence} about {decision.fingerprint} is"
                f" not newer than the newest one ({newest}); list the key again"
                " and sign a new decision"
            )
        source = existing.source if existing is not None else ""
        if refusalState(decision.state):
            # In force at once; stored as soon as the store takes it.
            self._applied(decision)
            try:
                record = await self._store(
                    decision, source, decision.signer, sender.fingerprint
                )
            except DecisionConflict as e:
                return Applied(decision, None, False, str(e))
            except Exception as e:
                self._retryLater(decision, source, sender.fingerprint, FIRST_RETRY)
                return Applied(decision, None, False, _message(e))
            return Applied(decision, record, True)
        try:
            record = await self._store(
                decision, source, decision.signer, sender.fingerprint
            )
        except DecisionConflict:
            raise DecisionRejected(
                f"another decision {decision.sequence} about"
                f" {decision.fingerprint} was made meanwhile; list the key again"
            ) from None
        except Exception as e:
            raise DecisionStoreFailed(_message(e)) from None
        self._applied(decision)
        return Applied(decision, record, True)

    async def _store(
        self, decision: SignedDecision, source: str, by: str, sentBy: str
    ) -> KeyRecord:
        return await self.store.record(
            decision.subject(),
            KeyState(decision.state),
            source,
            by,
            decision.encode(),
            decision.sequence,
            sentBy,
        )

    def _retryLater(
        self, decision: SignedDecision, source: str, sentBy: str, wait: float
    ) -> None:
        call = self._clock.callLater(wait, self._retry, decision, source, sentBy, wait)
        self._unstored[decision.fingerprint] = (decision, call)
        self.log.warn(
            "dwtrust: {state} {fingerprint} is in force, but not stored yet;"
            " trying again in {wait} s",
            event="dwtrust.decision_unstored",
            state=decision.state,
            fingerprint=decision.fingerprint,
            wait=wait,
        )

    def _retry(
        self, decision: SignedDecision, source: str, sentBy: str, wait: float
    ) -> None:
        if self._unstored.get(decision.fingerprint, (None,))[0] is not decision:
            return

        def stored(result: object) -> None:
            if isinstance(result, Failure) and not result.check(DecisionConflict):
                self._retryLater(decision, source, sentBy, min(wait * 2, MAX_RETRY))
                return
            self._unstored.pop(decision.fingerprint, None)
            self.log.info(
                "dwtrust: {state} {fingerprint} is stored now",
                event="dwtrust.decision_stored",
                state=decision.state,
                fingerprint=decision.fingerprint,
            )

        storing = Deferred.fromCoroutine(
            self._store(decision, source, decision.signer, sentBy)
        )
        storing.addBoth(stored)

    def stop(self) -> None:
        """
        Stop retrying (the process is ending; what is not stored yet is in
        this instance's own file).
        """
        for _, call in self._unstored.values():
            if call.active():
                call.cancel()
        self._unstored.clear()

    def _applied(self, decision: SignedDecision) -> None:
        """
        Put C{decision} in force here: remember it, close the key's sessions
        if it refuses the key, and wake whoever waits for it.
        """
        self.newest.remember(decision)
        if refusalState(decision.state):
            self._closeSessions(decision.fingerprint, decision.state)
        if self.bus is not None:
            self.bus.decided(decision)

    def _closeSessions(self, fingerprint: str, state: str) -> None:
        sessions = list(self.sessions(fingerprint)) if self.sessions else []
        for session in sessions:
            session.transport.abortConnection()
        if sessions:
            self.log.info(
                "dwtrust: closed {count} session(s) of {fingerprint}, now {state}",
                event="dwtrust.sessions_closed",
                count=len(sessions),
                fingerprint=fingerprint,
                state=state,
            )

    # Other instances

    def fromFleet(self, change: StoreChange) -> Deferred[None]:
        """
        Act on a change another instance made to the shared store: a
        decision newer than any seen here is put in force here; an older
        one is a rollback, refused.  A refusal that does not verify still
        closes the key's sessions: failing closed is safe.
        """
        acting = Deferred.fromCoroutine(self._fromFleet(change))
        return acting.addErrback(self._fleetFailed, change)

    def _fleetFailed(self, failure: Failure, change: StoreChange) -> None:
        self.log.warn(
            "dwtrust: cannot act on another instance's change to {fingerprint}:"
            " {error}",
            event="dwtrust.fleet_change_failed",
            fingerprint=change.fingerprint,
            error=failure.getErrorMessage(),
        )

    async def _fromFleet(self, change: StoreChange) -> None:
        record = change.record
        if change.local or record is None or change.kind != "decided":
            return
        decision, news = await self._current(record)
        if decision is not None and (news or decision.encode() == record.decision):
            # News, or the change itself that a lookup here read first (and
            # only remembered): put it in force, which wakes the connections
            # waiting for it and closes the sessions it refuses.
            self._applied(decision)
        elif decision is None and refusalState(record.state.value):
            self._closeSessions(record.fingerprint, record.state.value)

    # Upgrading

    async def carryOver(self) -> int:
        """
        Re-sign, with the service's own key, every version 1 decision in the
        store that is the newest about its key and still counts, as
        decision 1 of that key's history; then mark this instance as
        carried over, after which a version 1 approval counts for nothing.

        @return: how many were carried over.
        """
        if self.newest.carriedOver:
            return 0
        carried = 0
        for record in await self.store.decided():
            old = self.verify(record) if record.sequence == 0 else None
            if old is None or old.version != 1:
                continue
            decision = SignedDecision.make(
                self.identity,
                self.serviceName,
                old.subject(),
                old.state,
                old.decidedAt,
                f"{old.reason} (version 1 decision signed by {old.signer},"
                " carried over)",
                self.identity.fingerprint,
                1,
            )
            try:
                await self._store(
                    decision, record.source, record.decidedBy, self.identity.fingerprint
                )
            except DecisionConflict:
                continue  # another instance carried it over
            self.newest.remember(decision)
            carried += 1
        await self.newest.markCarriedOver()
        if carried:
            self.log.info(
                "dwtrust: carried {count} version 1 decision(s) over to version 2",
                event="dwtrust.decisions_carried_over",
                count=carried,
            )
        return carried


def refuseChangedIdentity(
    bus: ControlBus | None,
    service: str,
    peer: PeerIdentity,
    source: str,
    reason: str,
    knownAs: str = "",
    knownKeys: tuple[str, ...] = (),
) -> Refusal:
    """
    The one way a service refuses a key whose identity changed: a key known
    under other names (C{knownAs}), or a new key for names known with other
    keys (C{knownKeys}).  Logs a C{dwtrust.identity_changed} warning, tells
    the owners with an C{identity_changed} control message naming both
    identities, and returns the L{Refusal} to raise.
    """
    _log.warn(
        "dwtrust: IDENTITY CHANGED: {reason}",
        event="dwtrust.identity_changed",
        reason=reason,
        peer_name=peer.name,
        fingerprint=peer.fingerprint,
        source=source,
        known_as=knownAs or None,
        known=knownKeys[0] if knownKeys else None,
    )
    if bus is not None:
        bus.publish(
            ControlMessage.about(
                "identity_changed",
                service,
                peer,
                source=source,
                knownAs=knownAs,
                knownKeys=knownKeys,
                reason=reason,
            )
        )
    return Refusal(ErrorCode.identity_changed, reason)


def _message(error: BaseException) -> str:
    return str(error) or type(error).__name__
