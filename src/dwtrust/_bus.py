"""
The control bus: how a running service tells its owners what needs deciding,
and how a decision reaches the connections waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from attrs import asdict, field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ._decision import SignedDecision


class _KeyFacts(Protocol):
    @property
    def fingerprint(self) -> str: ...

    @property
    def org(self) -> str: ...

    @property
    def service(self) -> str: ...

    @property
    def algorithm(self) -> str: ...


class _RequestFacts(_KeyFacts, Protocol):
    @property
    def source(self) -> str: ...

    @property
    def requestId(self) -> str: ...

    @property
    def firstSeen(self) -> float: ...

    @property
    def attempts(self) -> int: ...


@frozen
class ControlMessage:
    """
    A message for a service's owners.

    @ivar kind: C{approval_requested}, C{identity_changed},
        C{forged_decision}, C{rollback}, C{decided}, C{expired},
        C{revoked_sessions} or C{join_token_reused}.
    @ivar service: the C{org/service} of the service it comes from.
    @ivar fingerprint: the key it is about.
    @ivar org: the key's claimed organization.
    @ivar peerService: the key's claimed service name.
    @ivar algorithm: the key's algorithm.
    @ivar source: where the key connected from.
    @ivar requestId: the pending request's identifier, if there is one.
    @ivar firstSeen: when the key was first seen.
    @ivar attempts: how many connections presented it.
    @ivar knownKeys: other keys already known for the same org/service.
    @ivar knownAs: for C{identity_changed}, the C{org/service} the key is
        known as, when it now claims another.
    @ivar state: for a decision, its state.
    @ivar decidedBy: for a decision, the signer's fingerprint.
    @ivar reason: a plain explanation.
    @ivar time: when the message was made.
    """

    kind: str
    service: str
    fingerprint: str
    org: str = ""
    peerService: str = ""
    algorithm: str = ""
    source: str = ""
    requestId: str = ""
    firstSeen: float = 0.0
    attempts: int = 0
    knownKeys: tuple[str, ...] = ()
    knownAs: str = ""
    state: str = ""
    decidedBy: str = ""
    reason: str = ""
    time: float = field(factory=time.time)

    @classmethod
    def about(
        cls, kind: str, service: str, key: _KeyFacts, **details: Any
    ) -> ControlMessage:
        """
        A message of C{kind}, from C{service}, about C{key}: anything with a
        fingerprint, an organization, a service name and an algorithm, such
        as a L{PeerIdentity} or a L{KeyRecord}.
        """
        return cls(
            kind,
            service,
            key.fingerprint,
            org=key.org,
            peerService=key.service,
            algorithm=key.algorithm,
            **details,
        )

    @classmethod
    def approvalRequested(
        cls,
        service: str,
        request: _RequestFacts,
        knownKeys: tuple[str, ...] = (),
        note: str = "",
    ) -> ControlMessage:
        """
        The owners' news of a new pending request (a pending L{KeyRecord}):
        C{approval_requested}, with the other keys C{knownKeys} of its
        org/service, and a C{note} on how it was raised, if any.
        """
        return cls.about(
            "approval_requested",
            service,
            request,
            source=request.source,
            requestId=request.requestId,
            firstSeen=request.firstSeen,
            attempts=request.attempts,
            knownKeys=knownKeys,
            reason=f"{request.org}/{request.service} wants to connect to {service}"
            + (f" ({note})" if note else ""),
        )

    def asJSON(self) -> dict[str, Any]:
        facts = asdict(self)
        facts["knownKeys"] = list(self.knownKeys)
        return facts

    @classmethod
    def fromJSON(cls, facts: dict[str, Any]) -> ControlMessage:
        known = tuple(facts.pop("knownKeys", ()))
        return cls(knownKeys=known, **facts)


class ControlBus:
    """
    Carries control messages to whoever watches (the owners' control
    connections, webhooks, the audit log) and signed decisions to the
    connections that wait for them.
    """

    log = Logger()

    def __init__(self) -> None:
        self._watchers: list[Callable[[ControlMessage], object]] = []
        self._waiting: dict[str, list[Deferred[SignedDecision]]] = {}

    def watch(self, watcher: Callable[[ControlMessage], object]) -> Callable[[], None]:
        """
        Call C{watcher} with every message from now on.

        @return: a function that stops it.
        """
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def publish(self, message: ControlMessage) -> None:
        self.log.info(
            "dwtrust: control message {kind} about {fingerprint}",
            event="dwtrust.control." + message.kind,
            kind=message.kind,
            fingerprint=message.fingerprint,
            message=message.asJSON(),
        )
        for watcher in list(self._watchers):
            try:
                watcher(message)
            except Exception:
                self.log.failure("dwtrust: a control watcher failed")

    def waitFor(self, fingerprint: str) -> Deferred[SignedDecision]:
        """
        A L{Deferred} that fires with the next decision about C{fingerprint};
        cancelling it stops the wait.
        """

        def cancel(waiting: Deferred[SignedDecision]) -> None:
            waiters = self._waiting.get(fingerprint, [])
            if waiting in waiters:
                waiters.remove(waiting)
            if not waiters:
                self._waiting.pop(fingerprint, None)

        waiting: Deferred[SignedDecision] = Deferred(cancel)
        self._waiting.setdefault(fingerprint, []).append(waiting)
        return waiting

    def decided(self, decision: SignedDecision) -> None:
        """
        A verified decision was put in force: wake whoever waits for it, and
        tell the watchers.
        """
        for waiting in self._waiting.pop(decision.fingerprint, []):
            waiting.callback(decision)
        self.publish(
            ControlMessage(
                "decided",
                decision.service,
                decision.fingerprint,
                org=decision.org,
                peerService=decision.subjectService,
                algorithm=decision.algorithm,
                state=decision.state,
                decidedBy=decision.signer,
                reason=decision.reason,
            )
        )
