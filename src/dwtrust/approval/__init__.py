"""
Approvers: who decides whether an unknown key may connect.

An approver's L{Deferred <twisted.internet.defer.Deferred>} fires with a
L{Decision}, or with L{None} to let the next approver of a L{ChainApprover}
decide.  L{approverFromSpecs} makes one from C{--approver} specs.
"""

from ._allow import AllowList, readAllowEntries
from ._builtin import (
    APPROVER_SPECS,
    BUILTIN_APPROVERS,
    AutoApprover,
    DenyApprover,
    KnownOnlyApprover,
    approverFromName,
    approverFromSpec,
    approverFromSpecs,
    checkApproverSpecs,
    redactSpec,
)
from ._chain import ChainApprover
from ._interface import ApprovalRequest, Decision, IApprover
from ._limits import ApproverLimits, KnownSources, LimitedApprover
from ._owners import OwnersApprover
from ._python import ApprovalCallback, CallableApprover, PythonApprover
from ._webhook import (
    DEFAULT_WEBHOOK_TIMEOUT,
    WebhookApprover,
    approvalMessage,
)

__all__ = [
    "APPROVER_SPECS",
    "BUILTIN_APPROVERS",
    "DEFAULT_WEBHOOK_TIMEOUT",
    "AllowList",
    "ApprovalCallback",
    "ApprovalRequest",
    "ApproverLimits",
    "AutoApprover",
    "CallableApprover",
    "ChainApprover",
    "Decision",
    "DenyApprover",
    "IApprover",
    "KnownOnlyApprover",
    "KnownSources",
    "LimitedApprover",
    "OwnersApprover",
    "PythonApprover",
    "WebhookApprover",
    "approvalMessage",
    "approverFromName",
    "approverFromSpec",
    "approverFromSpecs",
    "checkApproverSpecs",
    "readAllowEntries",
    "redactSpec",
]
