"""
dwtrust: zero-trust authentication for Twisted services.

Every connection runs over ECDHE-only TLS and then a challenge-response
handshake, bound to that TLS session, in which each side proves its
organization, service name and key.  Unknown keys go to an approver; the
application protocol is connected only once its peer is trusted.
"""

from ._authority import DecisionRejected, Decisions, DecisionStoreFailed
from ._endpoints import closeEndpointStores
from ._identity import Identity, IdentityError, PeerIdentity, PublicKey
from ._limits import Limits
from ._machine import Refusal
from ._policy import ApprovalPolicy, ITrustPolicy, PinningPolicy
from ._protocol import AuthenticatedTransport, HandshakeFailed, IAuthenticatedTransport
from ._version import __version__
from ._wire import ErrorCode
from ._wrap import Authenticator, ClientEndpoint, ServerEndpoint, openAuthenticator

__all__ = [
    "ApprovalPolicy",
    "AuthenticatedTransport",
    "Authenticator",
    "ClientEndpoint",
    "DecisionRejected",
    "DecisionStoreFailed",
    "Decisions",
    "ErrorCode",
    "HandshakeFailed",
    "IAuthenticatedTransport",
    "ITrustPolicy",
    "Identity",
    "IdentityError",
    "Limits",
    "PeerIdentity",
    "PinningPolicy",
    "PublicKey",
    "Refusal",
    "ServerEndpoint",
    "__version__",
    "closeEndpointStores",
    "openAuthenticator",
]
