"""
The provisioning commands of the control channel, in AMP.

An owner asks for a join token with L{IssueJoinToken}.  Any other key that
completes the handshake on the control endpoint (a new instance, a service
router) may use only these:

- L{Join}: redeem a join token; the answer is the service's identity and its
  owners' registrations (seed S6).
- L{RequestKey} and L{CollectKey}: ask the owners for the service's key, then
  wait for their signed answer; on release, the same answer as L{Join}
  (seed S7).
- L{ServiceRecords}: after a successful L{Join} or L{CollectKey} on the same
  connection, the service's signed decisions, one page at a time.
"""

from __future__ import annotations

from twisted.protocols import amp

from ..control._protocol import ControlFailed, NotAnOwner
from ._tokens import JoinError, JoinRefused


class KeyRequestRefused(Exception):
    """
    A key request that the owners withheld, that lapsed, that the caps
    refused, or that was never made on this connection.
    """


#: The errors every provisioning command may answer with.
_ERRORS: dict[type[Exception], bytes] = {
    ControlFailed: b"CONTROL_FAILED",
    NotAnOwner: b"NOT_AN_OWNER",
    JoinRefused: b"JOIN_REFUSED",
    KeyRequestRefused: b"KEY_REQUEST_REFUSED",
}


class IssueJoinToken(amp.Command):
    """
    An owner asks for a one-time join token that lives C{ttl} seconds.  The
    answer is the token's id and secret, and when it lapses; the owner's end
    puts them together with the endpoint to dial and the service's key
    fingerprint into a L{JoinToken}.
    """

    arguments = [(b"ttl", amp.Float())]
    response = [
        (b"tokenId", amp.Unicode()),
        (b"secret", amp.String()),
        (b"expires", amp.Integer()),
    ]
    errors = {JoinError: b"JOIN_ERROR", **_ERRORS}


#: The answer to L{Join} and L{CollectKey}: the service's identity (its
#: private key as OpenSSH PEM) and its owners' registrations.
_KIT = [
    (b"org", amp.Unicode()),
    (b"service", amp.Unicode()),
    (b"privateKey", amp.String()),
    (b"owners", amp.ListOf(amp.String())),
    (b"records", amp.Integer()),
]


class Join(amp.Command):
    """
    Redeem a join token: C{tokenId} names it, C{proof} is
    L{JoinToken.proof} for this connection's two keys, and C{instance} names
    the new instance for the audit log.
    """

    arguments = [
        (b"tokenId", amp.Unicode()),
        (b"proof", amp.String()),
        (b"instance", amp.Unicode()),
    ]
    response = _KIT
    errors = _ERRORS


class RequestKey(amp.Command):
    """
    Ask the service's owners for its key.  The answer comes at once: the
    request's id and when it lapses; L{CollectKey} then waits for the owners.
    """

    arguments = [(b"instance", amp.Unicode())]
    response = [(b"requestId", amp.Unicode()), (b"expires", amp.Float())]
    errors = _ERRORS


class CollectKey(amp.Command):
    """
    Wait for the owners' answer to this connection's L{RequestKey}.
    """

    arguments = []
    response = _KIT
    errors = _ERRORS


class ServiceRecords(amp.Command):
    """
    A page of the service's signed decisions (encoded), from C{offset}.
    """

    arguments = [(b"offset", amp.Integer())]
    response = [(b"decisions", amp.ListOf(amp.String())), (b"total", amp.Integer())]
    errors = _ERRORS
