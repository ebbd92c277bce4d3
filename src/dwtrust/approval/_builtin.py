"""
The built-in approvers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ._chain import ChainApprover
from ._interface import ApprovalRequest, Decision, IApprover
from ._limits import (
    ApproverCalls,
    ApproverLimits,
    CallLimited,
    KnownSources,
    LimitedApprover,
)
from ._python import PythonApprover, resolveCallback
from ._webhook import WebhookApprover, checkWebhookURL, maskURL


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


@implementer(IApprover)
class DenyApprover:
    """
    Refuses every key it is asked about, and stores nothing about it.  Alone,
    it admits only the keys already approved, as C{known-only} does; at the
    end of a chain, it says "and nobody else".
    """

    name = "deny"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return succeed(
            Decision(False, "denied by the deny approver", self.name, remember=False)
        )


#: The approvers that need nothing but their name, by name.
BUILTIN_APPROVERS: dict[str, Callable[[], IApprover]] = {
    "auto": AutoApprover,
    "known-only": KnownOnlyApprover,
    "deny": DenyApprover,
}

#: Every form an approver spec takes, in the order they are documented.
APPROVER_SPECS = (
    "owners",
    "auto",
    "known-only",
    "deny",
    "webhook:URL",
    "python:package.module.callable",
)


def redactSpec(spec: str) -> str:
    """
    An approver spec fit to log: a URL in it (C{webhook:URL}, or a spec
    that looks like one) has its credentials masked (see L{maskURL}).
    """
    kind, colon, argument = spec.partition(":")
    if "://" in argument:
        return kind + colon + maskURL(argument)
    if "://" in spec:
        return maskURL(spec)
    return spec


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"unknown approver {redactSpec(spec)!r}; choose one of"
        f" {', '.join(APPROVER_SPECS)}"
    )


def _ownersMissing() -> ValueError:
    return ValueError(
        "the 'owners' approver is not available here: it needs the trust"
        " daemon's owners (its store and control channel)"
    )


def checkApproverSpecs(specs: Sequence[str], owners: bool = True) -> None:
    """
    Check approver specs without making any approver: every name is known,
    every webhook URL is well formed, every Python callback imports.

    @param owners: whether C{owners} is available where they will be used.
    @raise ValueError: for the first spec that is wrong, saying why.
    """
    if not specs:
        raise ValueError("no approver given")
    for spec in specs:
        kind, _, argument = spec.partition(":")
        if kind == "webhook" and argument:
            checkWebhookURL(argument)
        elif kind == "python" and argument:
            resolveCallback(argument)
        elif spec == "owners":
            if not owners:
                raise _ownersMissing()
        elif spec not in BUILTIN_APPROVERS:
            raise _unknown(spec)


def approverFromSpec(
    spec: str,
    owners: IApprover | None = None,
    webhookAuthorization: str | None = None,
) -> IApprover:
    """
    The approver that one spec names:

      - C{owners}: C{owners} (the service's owners decide, through the CLI);
      - C{auto}: L{AutoApprover};
      - C{known-only}: L{KnownOnlyApprover};
      - C{deny}: L{DenyApprover};
      - C{webhook:URL}: a L{WebhookApprover} for C{URL};
      - C{python:package.module.callable}: a L{PythonApprover}.

    @param owners: the owners' approver, where there is one.
    @param webhookAuthorization: the C{Authorization} header a webhook
        sends, if its credentials are not in its URL.
    @raise ValueError: for an unknown spec, a bad URL or callback, or
        C{owners} when C{owners} is L{None}.
    """
    kind, _, argument = spec.partition(":")
    if kind == "webhook" and argument:
        return WebhookApprover(argument, authorization=webhookAuthorization)
    if kind == "python" and argument:
        return PythonApprover(argument)
    if spec == "owners":
        if owners is None:
            raise _ownersMissing()
        return owners
    factory = BUILTIN_APPROVERS.get(spec)
    if factory is None:
        raise _unknown(spec)
    return factory()


def approverFromSpecs(
    specs: Sequence[str],
    owners: IApprover | None = None,
    limits: ApproverLimits | None = None,
    known: KnownSources | None = None,
    webhookAuthorization: str | None = None,
) -> IApprover:
    """
    The approver that specs name (see L{approverFromSpec}).  Several are
    asked in order, as a L{ChainApprover}: C{["python:acme.policy.decide",
    "owners"]} lets acme's policy decide what it can, and the owners the rest.

    @param owners: the owners' approver, where there is one.
    @param limits: if given, the whole chain runs behind these caps (a
        L{LimitedApprover}), and the machine approvers in it (webhooks,
        Python callbacks) behind a shared cap on calls at once.
    @param known: the prefixes the reserved share of C{limits} is for.
    @raise ValueError: if C{specs} is empty, or for any spec that is wrong.
    """
    if isinstance(specs, str):
        raise TypeError("approverFromSpecs takes a sequence of specs, not a str")
    if not specs:
        raise ValueError("no approver given")
    approvers = [approverFromSpec(spec, owners, webhookAuthorization) for spec in specs]
    if limits is not None:
        calls = ApproverCalls(limits.maxCalls)
        approvers = [
            CallLimited(a, calls)
            if isinstance(a, (WebhookApprover, PythonApprover))
            else a
            for a in approvers
        ]
    approver = approvers[0] if len(approvers) == 1 else ChainApprover(approvers)
    if limits is None:
        return approver
    return LimitedApprover(approver, limits, known)


def approverFromName(name: str) -> IApprover:
    """
    The approver one spec names, where there are no owners (an endpoint
    string, say): L{approverFromSpec} with no owners.

    @raise ValueError: for a name that is not one.
    """
    return approverFromSpec(name)
