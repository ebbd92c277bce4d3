"""
Test helpers for the decisions in force (L{dwtrust._authority}).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from dwtrust._authority import Decisions
from dwtrust._bus import ControlBus
from dwtrust._decision import SignedDecision, Signers
from dwtrust._identity import Identity, PeerIdentity
from dwtrust.store import ITrustStore
from dwtrust.store._newest import NewestDecisions


def decisionsFor(
    service: Identity,
    store: ITrustStore,
    owners: Signers | None = None,
    bus: ControlBus | None = None,
    clock: IReactorTime | None = None,
) -> Decisions:
    """
    The decisions of C{service}, remembering the newest in memory only.
    """
    if clock is None:
        from twisted.internet import reactor

        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    return Decisions(
        service,
        store,
        owners if owners is not None else Signers(),
        NewestDecisions.inMemory(),
        bus,
        clock.seconds,
        clock,
    )


def sign(
    signer: Identity,
    service: Identity,
    subject: PeerIdentity,
    state: str,
    at: float,
    reason: str = "",
    sequence: int = 1,
) -> SignedDecision:
    """
    C{signer}'s decision about C{subject} for C{service}, at place
    C{sequence} in the key's history.
    """
    return SignedDecision.make(
        signer, service.name, subject, state, at, reason, service.fingerprint, sequence
    )
