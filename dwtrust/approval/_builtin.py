"""
The built-in approvers.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ._interface import ApprovalRequest, Decision, IApprover


@implementer(IApprover)
class AutoApprover:
    """
    Approves every key, and says so loudly: for tests and first experiments,
    never for a service that matters.
    """

    log = Logger()
    name = "auto"

    def __init__(self) -> None:
        self.log.warn(
            "dwtrust: the 'auto' approver trusts EVERY key that connects;"
            " use it only for testing",
            event="dwtrust.approver.auto",
        )

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        self.log.warn(
            "dwtrust: auto-approving {peer_name} {fingerprint} from {source}",
            event="dwtrust.approver.auto",
            peer_name=request.peer.name,
            fingerprint=request.peer.fingerprint,
            source=request.source,
        )
        return succeed(Decision(True, "approved by the auto approver", self.name))


@implementer(IApprover)
class KnownOnlyApprover:
    """
    Refuses every key the trust store does not already approve.  Nothing is
    recorded about the refused key.
    """

    name = "known-only"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return succeed(
            Decision(
                False,
                "unknown key; this service admits only keys it already knows",
                self.name,
                remember=False,
            )
        )


BUILTIN_APPROVERS = {"auto": AutoApprover, "known-only": KnownOnlyApprover}


def approverFromName(name: str) -> IApprover:
    """
    A built-in approver by its command-line name.

    @raise ValueError: for a name that is not one.
    """
    factory = BUILTIN_APPROVERS.get(name)
    if factory is None:
        raise ValueError(
            f"unknown approver {name!r}; choose one of"
            f" {', '.join(sorted(BUILTIN_APPROVERS))}"
        )
    approver: IApprover = factory()
    return approver
