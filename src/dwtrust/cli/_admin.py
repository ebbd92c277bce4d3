"""
A service's own administration, where its identity is: C{dwtrust
add-owner} and C{migrate}.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from twisted.python import usage
from twisted.python.filepath import FilePath

from .._decision import DecisionError, readOwnerKey, registerOwner
from .._identity import Identity
from .._options import GNUOptions
from .._wrap import STORE_FILE
from ..store import SQLiteStore, StoreError, migrateStore
from ..store._open import redacted
from ._common import FAILED, OK, CommandError, _IdentityOptions


class AddOwnerOptions(_IdentityOptions):
    synopsis = "[options] OWNER_PUBKEY_FILE"
    longdesc = (
        "Register an owner in a service's trust store, signed with the "
        "service's own key: the local, deliberate way to recover from lost "
        "owner keys. Run it where the service's identity directory is; the "
        "daemon reads registered owners when it starts, and again on SIGHUP."
    )
    optParameters = [
        *_IdentityOptions.optParameters,
        ["store", None, None, f"The SQLite trust store [IDENTITY/{STORE_FILE}]."],
    ]

    def parseArgs(self, ownerKey: str) -> None:  # type: ignore[override]
        self["owner-key"] = ownerKey

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


class MigrateOptions(GNUOptions):
    synopsis = "--store PATH_OR_URL"
    longdesc = (
        "Create or upgrade the schema of a trust store: a SQLite file, or a "
        "postgresql:// URL. Prints the schema version before and after."
    )
    optParameters: list[list[Any]] = [
        ["store", None, None, "The trust store: a SQLite file or a postgresql:// URL."],
    ]

    def postOptions(self) -> None:
        if not self["store"]:
            raise usage.UsageError("--store is required")


def migrate(options: MigrateOptions, out: TextIO, err: TextIO) -> int:
    """
    C{dwtrust migrate}: bring a store's schema up to date.
    """
    where = redacted(options["store"])
    try:
        before, after = migrateStore(options["store"])
    except StoreError as e:
        err.write(f"dwtrust: {e}\n")
        return FAILED
    if before == after:
        out.write(f"{where}: schema version {after}, up to date\n")
    else:
        out.write(f"{where}: schema version {before} -> {after}\n")
    return OK


async def _addOwner(options: AddOwnerOptions, out: TextIO) -> int:
    service = Identity.load(options.directory)
    try:
        with open(options["owner-key"]) as f:
            owner = readOwnerKey(f.read())
    except OSError as e:
        raise CommandError(f"cannot read {options['owner-key']}: {e}") from None
    except DecisionError as e:
        raise CommandError(f"{options['owner-key']}: {e}") from None
    registration = registerOwner(service, owner, time.time())
    store = await SQLiteStore.open(options.store)
    try:
        await store.addOwner(owner.fingerprint, registration.encode())
    finally:
        await store.close()
    out.write(
        f"registered {owner.name} ({owner.fingerprint}) as an owner of"
        f" {service.name}; send its daemon SIGHUP (or restart it) to take"
        " effect\n"
    )
    return OK
