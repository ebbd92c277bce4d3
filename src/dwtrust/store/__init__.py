"""
Trust stores: what a service knows about its peers' keys.
"""

from ._interface import (
    DecisionConflict,
    IKnownServices,
    IStoreEvents,
    ITrustStore,
    KeyRecord,
    KeyState,
    PendingFull,
    Pin,
    StoreChange,
    sourceHost,
)
from ._newest import NewestDecisions, NewestError
from ._open import (
    DEFAULT_POOL_SIZE,
    AnyStore,
    StoreUnavailable,
    isPostgreSQL,
    migrateStore,
    openStore,
    openStoreAtStartup,
)
from ._postgres import PostgreSQLStore
from ._sqlite import SCHEMA_VERSION, SQLiteStore, StoreError

__all__ = [
    "DEFAULT_POOL_SIZE",
    "SCHEMA_VERSION",
    "AnyStore",
    "DecisionConflict",
    "IKnownServices",
    "IStoreEvents",
    "ITrustStore",
    "KeyRecord",
    "KeyState",
    "NewestDecisions",
    "NewestError",
    "PendingFull",
    "Pin",
    "PostgreSQLStore",
    "SQLiteStore",
    "StoreChange",
    "StoreError",
    "StoreUnavailable",
    "isPostgreSQL",
    "migrateStore",
    "openStore",
    "openStoreAtStartup",
    "sourceHost",
]
