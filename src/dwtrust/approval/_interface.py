"""
The approver's contract: asked about a key the trust store does not know, it
answers (maybe much later) with a L{Decision}.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface

from .._decision import SignedDecision
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
    @ivar signed: the owner's signed decision behind it, when the owners
        decided (and stored it already): the connection it wakes must have
        proved the identity that decision names.
    """

    approved: bool
    reason: str
    decidedBy: str
    remember: bool = True
    signed: SignedDecision | None = None


class IApprover(Interface):
    """
    Decides whether an unknown key may connect.
    """

    def requestApproval(
        request: ApprovalRequest,
    ) -> Deferred[Decision] | Deferred[Decision | None]:
        """
        Decide about C{request}.

        The L{Deferred} fires with a L{Decision}, or with L{None} to abstain:
        "no opinion, ask the next approver".  Approvers compose that way (see
        L{ChainApprover <dwtrust.approval.ChainApprover>}): a policy of one's
        own can decide some requests and pass the rest on to the owners.  An
        approver asked on its own that abstains refuses the key, and nothing
        is stored.

        The L{Deferred} may take as long as the owners do; if the peer goes
        away first, it is cancelled, and the approver should then stop
        whatever it was waiting for.  It may also fail with a L{Refusal
        <dwtrust.Refusal>}, whose code the peer is told.

        (An approver that never abstains may say it returns a
        C{Deferred[Decision]}; L{Deferred} is invariant, hence the union.)
        """
