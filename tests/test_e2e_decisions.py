"""
End to end, with real C{twistd dwtrust} and C{dwtrust} processes: trust
decisions mean exactly what the owner signed.

- An approval covers a whole identity: an approved key claiming other names,
  or a pending one switching names, is refused with C{identity_changed}.
- A decision is bound to one service, by its key: a decision made for
  another service with the same name counts for nothing.
- Decisions never go backwards: an older decision restored in the store, or
  sent again over the control channel, is refused, also after a restart.
- A revocation takes effect even when the store cannot be written.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.python.filepath import FilePath

from dwtrust import Identity

from .processes import (
    DEADLINE,
    PRIVATE_KEY,
    Daemon,
    EchoServer,
    Lines,
    describe,
    finish,
    start_session,
    wait_for,
)
from .test_e2e_owners import (
    HELLO,
    Made,
    Site,
    approveHeld,
    assertConnected,
    assertRefused,
    echoSizes,
    made,
    requested,
    writeStore,
)

__all__ = ["made"]


@pytest.fixture
def site(tmp_path: Path, made: dict[str, Made]) -> Site:
    return Site(tmp_path, made)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def renamed(site: Site, name: str, org: str, service: str) -> str:
    """
    A copy of C{name}'s identity (the same key) that claims C{org/service};
    return the copy's name in C{site}.
    """
    original = Identity.load(FilePath(str(site.path(name))))
    copy = f"{name}-as-{service}"
    Identity.fromPrivateKey(org, service, original.privateKey).save(
        FilePath(str(site.path(copy)))
    )
    return copy


def audited(site: Site, event: str) -> list[dict[str, object]]:
    return [e for e in site.audited() if e.get("event") == event]


def test_approvedKeyClaimingAnotherName(site: Site, echo: EchoServer) -> None:
    """
    acme/billing's approved key, presented as acme/payroll (which has an
    approved key of its own), is refused with C{identity_changed}: the
    application is never connected, nothing is stored, and the owners are
    told, with both names.
    """
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
        approveHeld(site, daemon, "payroll")
        before = site.peers()
        impostor = renamed(site, "billing", "acme", "payroll")
        assertRefused(site.connect(impostor, daemon), "identity_changed")
        assert echoSizes(echo) == [len(HELLO), len(HELLO)]
        assert site.peers() == before
        assert site.pending() == []
        daemon.wait_for_log(r"IDENTITY CHANGED: .* claims acme/payroll")
    [changed] = audited(site, "dwtrust.identity_changed")
    assert (changed["peer_name"], changed["known_as"]) == (
        "acme/payroll",
        "acme/billing",
    )
    [message] = [
        e["message"]
        for e in audited(site, "dwtrust.control.identity_changed")
        if isinstance(e.get("message"), dict)
    ]
    assert isinstance(message, dict)
    assert (message["peerService"], message["knownAs"]) == ("payroll", "acme/billing")
    assert f"authenticated client acme/payroll {site.fp('billing')}" not in daemon.log()


def test_pendingKeySwitchingNames(site: Site, echo: EchoServer) -> None:
    """
    A key held while its request waits, connecting again under another
    name, is refused with C{identity_changed}; the owners' approval of the
    request they saw then lets in the connection that claimed that name.
    """
    with site.daemon(echo) as daemon:
        held = site.start_connect("billing", daemon)
        requested(daemon, site.fp("billing"))
        switched = renamed(site, "billing", "acme", "admin")
        assertRefused(site.connect(switched, daemon), "identity_changed")
        [request] = site.pending()
        peer = request["peer"]
        assert (peer["organization"], peer["service"]) == ("acme", "billing")
        site.decide("approve", request["requestId"])
        assertConnected(finish(held))
        # Approved as acme/billing, the key still cannot be acme/admin.
        assertRefused(site.connect(switched, daemon), "identity_changed")
    assert echoSizes(echo) == [len(HELLO)]


def test_decisionForAnotherServiceOfTheSameName(
    site: Site, echo: EchoServer, tmp_path: Path
) -> None:
    """
    Two services named acme/ledger, with their own keys and the same owner:
    an approval signed for one, copied into the other's store, counts for
    nothing there; the key waits for that service's owners.
    """
    twin = tmp_path / "twin"
    Identity.generate("acme", "ledger").save(FilePath(str(twin)))
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
    connection = sqlite3.connect(site.store)
    try:
        rows = connection.execute("SELECT * FROM decisions").fetchall()
    finally:
        connection.close()
    assert len(rows) == 1
    twinStore = twin / "trust.sqlite3"
    alice = str(site.path("alice") / f"{PRIVATE_KEY}.pub")
    with Daemon(
        tmp_path / "twin-daemon",
        "--identity",
        str(twin),
        "--forward",
        echo.forward,
        "--owner",
        alice,
        "--decision-timeout",
        "2",
    ) as other:
        wait_for(twinStore.exists, "the twin's store")
        writeStore(
            twinStore,
            "INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows[0],
        )
        # billing pinned the first acme/ledger's key, and would refuse the
        # twin's: it dials the twin from a copy with no pins.
        fresh = renamed(site, "billing", "acme", "billing")
        assertRefused(site.connect(fresh, other), "pending")
        other.wait_for_log(r"REFUSED a stored decision: .* is approved in the store")
        assert re.search(r"whose key is SHA256:\S+, not this one", other.log())
    assert echoSizes(echo) == [len(HELLO)]


def restoreOlderApproval(store: Path, fingerprint: str) -> None:
    """
    Put a key's revoked record back to its older approval, as anyone with
    write access to the file could: drop the guards, delete the newer
    decision, and mark the key approved again.
    """
    connection = sqlite3.connect(store)
    try:
        with connection:
            connection.execute("DROP TRIGGER decisions_are_not_deleted")
            connection.execute(
                "DELETE FROM decisions WHERE fingerprint = ? AND sequence = 2",
                (fingerprint,),
            )
            connection.execute(
                "UPDATE peers SET state = 'approved' WHERE fingerprint = ?",
                (fingerprint,),
            )
            (state,) = connection.execute(
                "SELECT state FROM decisions WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
    finally:
        connection.close()
    assert state == "approved"


def test_rollbackInTheStoreRefused(site: Site, echo: EchoServer) -> None:
    """
    After a revocation, the older approval restored in the SQLite store does
    not let the key back in, before or after a restart: the daemon refuses
    it with C{revoked} and logs the rollback.
    """
    billing = site.fp("billing")
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
        site.decide("revoke", billing)
        assertRefused(site.connect("billing", daemon), "revoked")
        restoreOlderApproval(site.store, billing)

        def refusedAfterReading() -> bool:
            # Every attempt is refused; the daemon notices the other writer
            # (and logs the rollback) within a second or so.
            assertRefused(site.connect("billing", daemon), "revoked")
            return "ROLLBACK REFUSED" in daemon.log()

        wait_for(refusedAfterReading, "the daemon to read the restored approval")
        daemon.wait_for_log(rf"ROLLBACK REFUSED: {re.escape(billing)}")
    with site.daemon(echo, name="restarted") as daemon:
        assertRefused(site.connect("billing", daemon), "revoked")
        daemon.wait_for_log(rf"ROLLBACK REFUSED: {re.escape(billing)}")
    assert echoSizes(echo) == [len(HELLO)]
    rollbacks = audited(site, "dwtrust.rollback")
    assert rollbacks and all(e["fingerprint"] == billing for e in rollbacks)


SEND_DECISION = """
import sys
from twisted.internet import task
from twisted.python.filepath import FilePath
from dwtrust import Identity
from dwtrust.control import Decide, openControl
from dwtrust.testing import MemoryTrustStore

async def main(reactor):
    identity = Identity.load(FilePath(sys.argv[2]))
    client = await openControl(reactor, identity, sys.argv[1], MemoryTrustStore())
    decision = bytes.fromhex(sys.stdin.read().strip())
    try:
        answer = await client.protocol.callRemote(Decide, decision=decision)
        print("APPLIED", answer["peer"])
    except Exception as e:
        print("REFUSED", e)
    await client.close(reactor)

from twisted.internet.defer import Deferred
task.react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
"""


def sendDecision(site: Site, who: str, decision: bytes) -> str:
    """
    Send an encoded decision over the control channel as the owner C{who},
    whoever signed it; what the service answered.
    """
    done = subprocess.run(
        [sys.executable, "-c", SEND_DECISION, site.control, str(site.path(who))],
        input=decision.hex().encode(),
        capture_output=True,
        timeout=DEADLINE * 2,
        check=False,
    )
    assert done.returncode == 0, describe(done)
    return done.stdout.decode()


def test_oldDecisionResentOverTheControlChannel(site: Site, echo: EchoServer) -> None:
    """
    Bob, an owner, sends again the approval Alice made before she revoked
    the key: it is refused as not newer, and the key stays revoked.  A new
    decision Alice signed and Bob sent is recorded with both.
    """
    billing = site.fp("billing")
    with site.daemon(echo, owners=("alice", "bob")) as daemon:
        approveHeld(site, daemon, "billing")
        site.decide("revoke", billing)
        connection = sqlite3.connect(site.store)
        try:
            [(approval,)] = connection.execute(
                "SELECT decision FROM decisions WHERE sequence = 1"
            ).fetchall()
        finally:
            connection.close()
        answer = sendDecision(site, "bob", bytes(approval))
        assert answer.startswith("REFUSED"), answer
        assert "not newer" in answer, answer
        assertRefused(site.connect("billing", daemon), "revoked")
        [entry] = site.listing("peers")["peers"]
        assert (entry["state"], entry["sequence"]) == ("revoked", 2)
        assert (entry["decidedBy"], entry["sentBy"]) == (site.fp("alice"),) * 2
        daemon.wait_for_log(r"ROLLBACK REFUSED: \S+ sent decision 1")


@contextlib.contextmanager
def smallFilesystem(path: Path, size: str) -> Iterator[Path]:
    """
    A tmpfs of C{size} mounted at C{path}: a disk that fills up.
    """
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    assert mounted.returncode == 0, describe(mounted)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """
    Fill the filesystem of C{directory} up; the file that fills it.
    """
    filler = directory / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def test_revocationWhileTheDiskIsFull(
    site: Site, echo: EchoServer, tmp_path: Path
) -> None:
    """
    With the store's disk full, a revocation still closes the key's open
    session and refuses the key; the owner's command says it is not stored;
    once there is room again, it is stored.
    """
    billing = site.fp("billing")
    with smallFilesystem(tmp_path / "disk", "4m") as disk:
        shutil.move(str(site.path("ledger")), str(disk / "ledger"))
        site.control = f"unix:{disk / 'ledger' / 'control.sock'}"
        site.store = disk / "ledger" / "trust.sqlite3"
        daemon = Daemon(
            tmp_path / "daemon",
            "--identity",
            str(disk / "ledger"),
            "--forward",
            echo.forward,
            "--audit-log",
            str(site.audit),
            "--owner",
            str(site.path("alice") / f"{PRIVATE_KEY}.pub"),
        )
        with daemon:
            approveHeld(site, daemon, "billing")
            session = start_session(
                "connect", "--identity", str(site.path("billing")), daemon.address
            )
            output = Lines(session.stdout)
            try:
                assert session.stdin is not None
                session.stdin.write(HELLO)
                session.stdin.flush()
                output.wait_for(r"^hello$")
                filler = fill(disk)
                done = site.owner("revoke", billing)
                assert done.returncode == 0, describe(done)
                said = done.stdout.decode()
                assert f"revoked acme/billing {billing}" in said, said
                assert "NOT STORED" in said, said
                assert "full" in said, said
                wait_for(session.poll, "the revoked session to end")
            finally:
                if session.poll() is None:
                    session.kill()
                session.wait(timeout=DEADLINE)
                assert session.stdin is not None
                session.stdin.close()
            assertRefused(site.connect("billing", daemon), "revoked")
            filler.unlink()
            daemon.wait_for_log(rf"revoked {re.escape(billing)} is stored now")
            connection = sqlite3.connect(site.store)
            try:
                states = connection.execute(
                    "SELECT sequence, state FROM decisions ORDER BY sequence"
                ).fetchall()
            finally:
                connection.close()
            assert states == [(1, "approved"), (2, "revoked")]
            assertRefused(site.connect("billing", daemon), "revoked")
    [unstored, *_] = audited(site, "dwtrust.decision_unstored")
    assert unstored["fingerprint"] == billing
