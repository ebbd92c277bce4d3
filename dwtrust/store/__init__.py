"""
Trust stores: what a service knows about its peers' keys.
"""

from ._interface import (
    IKnownServices,
    ITrustStore,
    KeyRecord,
    KeyState,
    PendingFull,
    Pin,
    sourceHost,
)
from ._sqlite import SCHEMA_VERSION, SQLiteStore, StoreError

__all__ = [
    "SCHEMA_VERSION",
    "IKnownServices",
    "ITrustStore",
    "KeyRecord",
    "KeyState",
    "PendingFull",
    "Pin",
    "SQLiteStore",
    "StoreError",
    "sourceHost",
]
