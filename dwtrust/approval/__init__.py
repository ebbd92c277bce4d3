"""
Approvers: who decides whether an unknown key may connect.
"""

from ._builtin import (
    BUILTIN_APPROVERS,
    AutoApprover,
    KnownOnlyApprover,
    approverFromName,
)
from ._interface import ApprovalRequest, Decision, IApprover

__all__ = [
    "BUILTIN_APPROVERS",
    "ApprovalRequest",
    "AutoApprover",
    "Decision",
    "IApprover",
    "KnownOnlyApprover",
    "approverFromName",
]
