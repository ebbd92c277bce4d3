"""
End to end, with real processes and a real PostgreSQL server: a fleet's
decisions never go backwards, even when someone with more than the
instances' grants rolls the shared store back.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from dwtrust.store._postgres import CHANNEL

from .processes import finish, wait_for
from .test_e2e_fleet import (
    Fleet,
    Made,
    assertConnected,
    assertRefused,
    echo,  # noqa: F401 (a fixture)
    identities,  # noqa: F401 (a fixture)
    requested,
)

if TYPE_CHECKING:
    from .postgres import PostgreSQLServer
    from .processes import Daemon, EchoServer

pytest_plugins = ["tests.postgres"]


def test_rollbackRefusedOnEveryInstance(
    tmp_path: Path,
    identities: dict[str, Made],  # noqa: F811
    database: str,
    echo: EchoServer,  # noqa: F811
    postgres: PostgreSQLServer,
) -> None:
    """
    Three instances on one store.  A key approved and then revoked through
    the first is refused by all three.  Then the database's owner (who can
    do what the instances' role cannot) deletes the revocation, puts the
    key's row back to approved and announces the change to every instance:
    each refuses the older approval as a rollback, and keeps refusing the
    key with C{revoked}.
    """
    fleet = Fleet(tmp_path, identities, database, echo)
    billing = fleet.fp("billing")
    with ExitStack() as stack:
        daemons = fleet.start(stack, 3)
        first = daemons[0]
        held = fleet.startConnect("billing", first)
        requested(first, billing)
        fleet.decide(first, "approve", billing)
        assertConnected(finish(held))
        for daemon in daemons:
            # Each instance reads (and remembers) the approval.
            assertConnected(fleet.connect("billing", daemon))
        fleet.decide(first, "revoke", billing)

        def refused(daemon: Daemon) -> bool:
            done = fleet.connect("billing", daemon)
            if done.status == 0:
                return False
            assertRefused(done, "revoked")
            return True

        for daemon in daemons:
            wait_for(lambda d=daemon: refused(d), "the revocation to reach it")

        postgres.sql(
            database,
            "ALTER TABLE decisions DISABLE TRIGGER USER",
        )
        postgres.sql(
            database,
            "DELETE FROM decisions WHERE fingerprint = %s AND sequence = 2",
            billing,
        )
        postgres.sql(
            database,
            "UPDATE peers SET state = 'approved' WHERE fingerprint = %s",
            billing,
        )
        [(state,)] = postgres.sql(
            database, "SELECT state FROM decisions WHERE fingerprint = %s", billing
        )
        assert state == "approved"
        postgres.sql(
            database,
            "SELECT pg_notify(%s, %s)",
            CHANNEL,
            json.dumps({"kind": "decided", "fingerprint": billing, "origin": "x"}),
        )
        for daemon in daemons:
            daemon.wait_for_log(rf"ROLLBACK REFUSED: {re.escape(billing)}")
            assertRefused(fleet.connect("billing", daemon), "revoked")
        for daemon in daemons:
            rollbacks = fleet.audited(daemon, "dwtrust.rollback")
            assert rollbacks, daemon.report()
            assert {e["fingerprint"] for e in rollbacks} == {billing}
