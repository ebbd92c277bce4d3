"""
The owners' control channel: control messages out, signed decisions in.

- L{ControlBus} and L{ControlMessage}: how a running service tells its owners
  what needs deciding, and hands their decisions to the connections waiting.
- The AMP commands of the channel: L{ListPending}, L{ListPeers}, L{Decide},
  L{Watch} and L{Notify}.
- The service's end: L{controlFactory}, wrapped with an L{Authenticator} whose
  inbound policy is L{OwnersOnlyPolicy}.
- An owner's end: L{openControl} and L{ControlClient}.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._bus import ControlBus, ControlMessage
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

if TYPE_CHECKING:
    from ._client import (
        ControlClient,
        ControlProtocol,
        Listing,
        openControl,
        signDecision,
        subjectOf,
    )
    from ._server import ControlPolicy, ControlServer, OwnersOnlyPolicy, controlFactory

# The server and client ends build on the trust policies and the
# Authenticator, which themselves use the bus: they are loaded on first use,
# so that importing the bus never imports them half-way through.
_LAZY = {
    "ControlClient": "._client",
    "ControlProtocol": "._client",
    "Listing": "._client",
    "openControl": "._client",
    "signDecision": "._client",
    "subjectOf": "._client",
    "ControlPolicy": "._server",
    "ControlServer": "._server",
    "OwnersOnlyPolicy": "._server",
    "controlFactory": "._server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ControlBus",
    "ControlClient",
    "ControlFailed",
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
