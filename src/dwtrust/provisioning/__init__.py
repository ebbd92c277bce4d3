"""
Provisioning: new instances, service routers and microservers get their keys
from the service and its owners, never from a file passed around by hand.

- New instances from a running one (seed S6): an owner takes a one-time,
  expiring join token from a running instance (L{issueJoinToken}, or
  C{dwtrust join-token}); the new instance redeems it over a dwtrust channel
  (L{clone}, C{dwtrust clone --join -} or C{twistd dwtrust --join-file PATH})
  and receives the service's key, owners and signed decisions.
- Service routers (seed S7): a router asks for the service's key
  (L{requestKey}, C{dwtrust request-key}); the owners are asked, and only
  their signed C{release} hands the key to that router.
- Microservers (seed S8): a microclient makes a microserver with both public
  keys installed (L{instantiate}, C{dwtrust instantiate}).

The running instance's side is L{Provisioning}, which the daemon's control
channel serves.
"""

from ._client import clone, defaultInstanceName, issueJoinToken, requestKey
from ._commands import KeyRequestRefused
from ._instantiate import INSTANTIATED_BY, SERVICE_PIN_PREFIX, instantiate, servicePin
from ._server import KeyRequests, Provisioning
from ._tokens import (
    DEFAULT_TOKEN_TTL,
    MAX_TOKEN_TTL,
    JoinError,
    JoinRefused,
    JoinReused,
    JoinToken,
    JoinTokens,
    argvTokenRefusal,
    readJoinToken,
    readSecretFile,
)

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "INSTANTIATED_BY",
    "MAX_TOKEN_TTL",
    "SERVICE_PIN_PREFIX",
    "JoinError",
    "JoinRefused",
    "JoinReused",
    "JoinToken",
    "JoinTokens",
    "KeyRequestRefused",
    "KeyRequests",
    "Provisioning",
    "argvTokenRefusal",
    "clone",
    "defaultInstanceName",
    "instantiate",
    "issueJoinToken",
    "readJoinToken",
    "readSecretFile",
    "requestKey",
    "servicePin",
]
