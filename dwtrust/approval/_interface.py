"""
The approver's contract: asked about a key the trust store does not know, it
answers (maybe much later) with a L{Decision}.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface

from .._identity import PeerIdentity


@frozen
class ApprovalRequest:
    """
    A peer with an unknown key asks to connect.

    @ivar peer: who it claims to be, and the key it proved it holds.
    @ivar source: the address it connects from.
    @ivar service: the name (C{org/service}) of the service it connects to.
    """

    peer: PeerIdentity
    source: str
    service: str


@frozen
class Decision:
    """
    An approver's answer.

    @ivar approved: whether the key may connect.
    @ivar reason: why, in a few words, for the audit log and the peer.
    @ivar decidedBy: who decided (an approver's or an owner's name).
    @ivar remember: whether the store records the decision; a policy that
        decides each time afresh says L{False}.
    """

    approved: bool
    reason: str
    decidedBy: str
    remember: bool = True


class IApprover(Interface):
    """
    Decides whether an unknown key may connect.
    """

    def requestApproval(request: ApprovalRequest) -> Deferred[Decision]:
        """
        Decide about C{request}.  The L{Deferred} may take as long as the
        owners do; if the peer goes away first, it is cancelled.
        """
