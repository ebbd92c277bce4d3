"""
Composition: approvers asked in turn, until one decides.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from zope.interface import implementer

from ._interface import ApprovalRequest, Decision, IApprover


def noDecision(decidedBy: str) -> Decision:
    """
    The refusal that stands when every approver abstained.  Nothing is
    stored, so the key is asked about afresh next time.

    @param decidedBy: who gives up (the chain, or the policy).
    """
    return Decision(False, "no approver decided", decidedBy, remember=False)


@implementer(IApprover)
class ChainApprover:
    """
    Asks each approver in turn, until one decides.

    An approver abstains by firing with L{None}; the next one is then asked.
    The first L{Decision} stands, approval or refusal alike.  If all abstain,
    the key is refused and nothing is stored.  A failure (a L{Refusal
    <dwtrust.Refusal>}, say) ends the chain.

    Cancelling the L{Deferred} cancels the approver being asked at the time;
    those after it are never asked.

        >>> ChainApprover([PythonApprover("acme.policy.decide"), owners])

    @ivar approvers: the approvers, in the order they are asked.
    """

    name = "chain"

    def __init__(self, approvers: Sequence[IApprover]) -> None:
        """
        @raise ValueError: if C{approvers} is empty.
        """
        if not approvers:
            raise ValueError("a chain of approvers needs at least one approver")
        self.approvers = tuple(approvers)

    def __repr__(self) -> str:
        return f"<ChainApprover {list(self.approvers)!r}>"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        return Deferred.fromCoroutine(self._ask(request))

    async def _ask(self, request: ApprovalRequest) -> Decision | None:
        for approver in self.approvers:
            decision = await approver.requestApproval(request)
            if decision is not None:
                return decision
        return noDecision(self.name)
