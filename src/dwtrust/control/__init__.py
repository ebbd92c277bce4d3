"""
The owners' control channel: control messages out, signed decisions in.

- L{ControlBus} and L{ControlMessage} (defined below the handshake, in
  L{dwtrust._bus}, and re-exported here): how a running service tells its
  owners what needs deciding.
- The AMP commands of the channel: L{ListPending}, L{ListPeers}, L{Decide},
  L{Watch} and L{Notify}.
- The service's end: L{controlFactory}, wrapped with an L{Authenticator} whose
  inbound policy is L{OwnersOnlyPolicy}.
- An owner's end: L{openControl} and L{ControlClient}.
"""

from __future__ import annotations

from .._bus import ControlBus, ControlMessage
from ._client import (
    ControlClient,
    ControlProtocol,
    Listing,
    openControl,
    signDecision,
    subjectOf,
)
from ._protocol import (
    ControlFailed,
    Decide,
    DecisionRefused,
    ListPeers,
    ListPending,
    NotAnOwner,
    Notify,
    Watch,
)
from ._server import (
    ControlLimits,
    ControlPolicy,
    ControlServer,
    OwnersOnlyPolicy,
    controlFactory,
)

__all__ = [
    "ControlBus",
    "ControlClient",
    "ControlFailed",
    "ControlLimits",
    "ControlMessage",
    "ControlPolicy",
    "ControlProtocol",
    "ControlServer",
    "Decide",
    "DecisionRefused",
    "ListPeers",
    "ListPending",
    "Listing",
    "NotAnOwner",
    "Notify",
    "OwnersOnlyPolicy",
    "Watch",
    "controlFactory",
    "openControl",
    "signDecision",
    "subjectOf",
]
