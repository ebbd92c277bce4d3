"""
One way in to every trust store: a description that is either the path of a
SQLite file or a C{postgresql://} URL (see L{isPostgreSQL}) opens the right
store, migrated to the current schema.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from ._sqlite import SCHEMA_VERSION, SQLiteStore, StoreError, migrateFile, ownersInFile

#: How many connections a PostgreSQL store keeps at most, unless told.
DEFAULT_POOL_SIZE = 4


class StoreUnavailable(StoreError):
    """
    The store cannot be reached right now (a PostgreSQL server that is down
    or unreachable); the request may succeed later.
    """


def isPostgreSQL(description: str) -> bool:
    """
    Whether C{description} names a PostgreSQL database (a C{postgresql://} or
    C{postgres://} URL) rather than a SQLite file.
    """
    return description.startswith(("postgresql://", "postgres://"))


def redacted(description: str) -> str:
    """
    C{description} fit for a log or a message: a URL's password is replaced
    by C{***}.
    """
    if not isPostgreSQL(description):
        return description
    parts = urlsplit(description)
    if parts.password is None:
        return description
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def openStore(
    description: str,
    poolSize: int = DEFAULT_POOL_SIZE,
    now: Callable[[], float] = time.time,
) -> Deferred[AnyStore]:
    """
    Open (creating and migrating as needed) the store C{description} names,
    without blocking the reactor.

    @param poolSize: for PostgreSQL, the most connections to keep.
    """

    async def opened() -> AnyStore:
        if isPostgreSQL(description):
            return await PostgreSQLStore.open(description, poolSize, now)
        return await SQLiteStore.open(FilePath(description), now)

    return Deferred.fromCoroutine(opened())


def openStoreAtStartup(
    description: str,
    poolSize: int = DEFAULT_POOL_SIZE,
    now: Callable[[], float] = time.time,
) -> tuple[AnyStore, list[bytes]]:
    """
    Open the store C{description} names at once, and read the owner
    registrations kept in it.  This blocks: call it only before the reactor
    runs (as C{twistd}'s C{makeService} does).

    @raise StoreError: if the store cannot be used.
    """
    if isPostgreSQL(description):
        store = PostgreSQLStore.fromURL(description, poolSize, now)
        return store, store.ownersNow()
    path = FilePath(description)
    sqlite = SQLiteStore.fromPath(path, now)
    return sqlite, ownersInFile(path.path)


def migrateStore(description: str) -> tuple[int, int]:
    """
    Create or upgrade the schema of the store C{description} names.  Blocks.

    @return: the schema version before, and after.
    @raise StoreError: if the store cannot be used, or has a newer schema.
    """
    if isPostgreSQL(description):
        return migrateURL(description), SCHEMA_VERSION
    return migrateFile(description), SCHEMA_VERSION


def migrateStoreInThread(description: str) -> Deferred[tuple[int, int]]:
    """
    L{migrateStore}, in a thread.
    """
    result: Deferred[tuple[int, int]] = threads.deferToThread(migrateStore, description)
    return result


# Last, since the PostgreSQL store uses the names above.  (psycopg itself is
# imported only when a PostgreSQL store is used.)
from ._postgres import PostgreSQLStore, migrateURL  # noqa: E402

#: What L{openStore} gives: a store that provides L{ITrustStore} and
#: L{IKnownServices}.
AnyStore: TypeAlias = SQLiteStore | PostgreSQLStore
