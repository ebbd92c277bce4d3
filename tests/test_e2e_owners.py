"""
End to end, with real processes, the owners' approval flow: the C{twistd
dwtrust} daemon holding unknown clients (C{dwtrust connect}) while its owners
decide with C{dwtrust pending}, C{approve}, C{deny}, C{revoke}, C{peers} and
C{watch} over its control endpoint; the SQLite trust store on disk, forged
rows in it, a crash, a flood of unknown keys, break-glass owner registration
and the JSON audit log.

Everything runs on 127.0.0.1 (and a UNIX socket for the control channel).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import frozen
from twisted.python.filepath import FilePath

from dwtrust import Identity
from dwtrust._decision import OWNER, SignedDecision, readOwnerKey

from .processes import (
    DEADLINE,
    PRIVATE_KEY,
    STORE,
    Connected,
    Daemon,
    EchoServer,
    Lines,
    connect,
    describe,
    fingerprint_in,
    finish,
    run_cli,
    start_cli,
    start_session,
    wait_for,
)

HELLO = b"hello\n"
#: Where a connection comes from, as the daemon reports it.
SOURCE = r"127\.0\.0\.1:\d+"
#: The service every daemon here is.
LEDGER = "acme/ledger"

#: The identities the tests use: name to (organization, service).
NAMES = {
    "ledger": ("acme", "ledger"),
    "billing": ("acme", "billing"),
    # Another key that claims to be acme/billing.
    "impostor": ("acme", "billing"),
    "payroll": ("acme", "payroll"),
    "reports": ("acme", "reports"),
    "search": ("acme", "search"),
    "mail": ("acme", "mail"),
    "alice": ("acme", "alice"),
    "bob": ("acme", "bob"),
    "bob2": ("acme", "bob2"),
}
#: Distinct unknown keys for the flood.
FLOOD = 12


@frozen
class Made:
    """
    An identity made by C{dwtrust keygen}.
    """

    directory: Path
    fingerprint: str


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """
    Every identity in L{NAMES}, made once with C{dwtrust keygen} (in
    parallel), and L{FLOOD} more for the flood (made in this process: the
    command is not what the flood tests).
    """
    base = tmp_path_factory.mktemp("identities")
    running = {
        name: start_cli(
            "keygen",
            "--identity",
            str(base / name),
            "--org",
            org,
            "--service",
            service,
        )
        for name, (org, service) in NAMES.items()
    }
    identities = {}
    for name, process in running.items():
        done = finish(process)
        assert done.returncode == 0, describe(done)
        identities[name] = Made(base / name, fingerprint_in(done.stdout.decode()))
    for number in range(FLOOD):
        name = f"flood{number}"
        identity = Identity.generate("acme", f"stranger{number}")
        identity.save(FilePath(str(base / name)))
        identities[name] = Made(base / name, identity.fingerprint)
    return identities


class Site:
    """
    One test's copies of the identities (so that every test starts with empty
    trust stores), and the commands run with them.
    """

    def __init__(self, base: Path, made: dict[str, Made]) -> None:
        self.base = base
        self.fingerprints = {name: m.fingerprint for name, m in made.items()}
        for name, m in made.items():
            shutil.copytree(m.directory, base / name)
        #: The daemon's control socket: its default, in its identity.
        self.control = f"unix:{base / 'ledger' / 'control.sock'}"
        #: The daemon's trust store: its default, in its identity.
        self.store = base / "ledger" / STORE
        self.audit = base / "audit.jsonl"

    def path(self, name: str) -> Path:
        return self.base / name

    def fp(self, name: str) -> str:
        return self.fingerprints[name]

    def daemon(
        self,
        echo: EchoServer,
        *options: str,
        port: int | None = None,
        owners: tuple[str, ...] = ("alice",),
        name: str = "daemon",
    ) -> Daemon:
        """
        The daemon of C{acme/ledger}, forwarding to C{echo}, with C{owners}
        given with C{--owner}, and its audit log in L{audit}.
        """
        ownerOptions = []
        for owner in owners:
            ownerOptions += ["--owner", str(self.path(owner) / f"{PRIVATE_KEY}.pub")]
        return Daemon(
            self.base / name,
            "--identity",
            str(self.path("ledger")),
            "--forward",
            echo.forward,
            "--audit-log",
            str(self.audit),
            *ownerOptions,
            *options,
            port=port,
        )

    def owner(
        self, command: str, *args: str, who: str = "alice"
    ) -> subprocess.CompletedProcess[bytes]:
        """
        An owner's command, C{dwtrust COMMAND}, run as C{who} against the
        daemon's control endpoint.
        """
        return run_cli(
            command,
            "--control",
            self.control,
            "--identity",
            str(self.path(who)),
            *args,
        )

    def listing(self, command: str, who: str = "alice") -> dict[str, Any]:
        """
        What C{dwtrust COMMAND --json} (C{pending} or C{peers}) printed.
        """
        done = self.owner(command, "--json", who=who)
        assert done.returncode == 0, describe(done)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def pending(self) -> list[dict[str, Any]]:
        """
        The pending requests, from C{dwtrust pending --json}, all of them.
        """
        listing = self.listing("pending")
        assert listing["omitted"] == 0, listing
        entries: list[dict[str, Any]] = listing["pending"]
        return entries

    def peers(self) -> dict[str, tuple[str, str]]:
        """
        The keys with a decision, from C{dwtrust peers --json}: fingerprint to
        (state, decided by).
        """
        listing = self.listing("peers")
        assert listing["omitted"] == 0, listing
        return {
            e["peer"]["fingerprint"]: (e["state"], e["decidedBy"])
            for e in listing["peers"]
        }

    def decide(self, command: str, target: str, who: str = "alice") -> str:
        """
        C{dwtrust COMMAND TARGET} (approve, deny, revoke...), which must
        succeed; return what it printed.
        """
        done = self.owner(command, target, who=who)
        assert done.returncode == 0, describe(done)
        return done.stdout.decode()

    def connect(self, name: str, daemon: Daemon, input: bytes = HELLO) -> Connected:
        return connect(self.path(name), daemon.address, input=input)

    def start_connect(self, name: str, daemon: Daemon) -> subprocess.Popen[bytes]:
        return start_cli(
            "connect", "--identity", str(self.path(name)), daemon.address, input=HELLO
        )

    def audited(self) -> list[dict[str, Any]]:
        """
        The audit log's events, one JSON object a line.
        """
        events = []
        for number, line in enumerate(self.audit.read_text().splitlines(), 1):
            try:
                event = json.loads(line)
            except ValueError:
                raise AssertionError(
                    f"line {number} of the audit log is not JSON: {line!r}"
                ) from None
            assert isinstance(event, dict), line
            events.append(event)
        return events


@pytest.fixture
def site(tmp_path: Path, made: dict[str, Made]) -> Site:
    return Site(tmp_path, made)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def assertConnected(result: Connected | subprocess.CompletedProcess[bytes]) -> None:
    """
    C{dwtrust connect} got through: it printed exactly what it sent (the echo
    server's answer) and exited 0.
    """
    if isinstance(result, subprocess.CompletedProcess):
        assert (result.returncode, result.stdout) == (0, HELLO), describe(result)
    else:
        assert (result.status, result.stdout) == (0, HELLO), str(result)


def assertRefused(
    result: Connected | subprocess.CompletedProcess[bytes], code: str
) -> None:
    """
    C{dwtrust connect} was refused by the server with C{code}: exit status
    3, nothing on standard output.
    """
    if isinstance(result, subprocess.CompletedProcess):
        result = Connected(
            result.returncode, result.stdout, result.stderr.decode(errors="replace")
        )
    assert result.status == 3, str(result)
    assert result.stdout == b"", str(result)
    assert f"the server refused this client: {code}:" in result.stderr, str(result)


def requested(daemon: Daemon, fingerprint: str) -> None:
    """
    Wait until the daemon has asked its owners about C{fingerprint}.
    """
    daemon.wait_for_log(
        rf"control message approval_requested about {re.escape(fingerprint)}"
    )


def requests(daemon: Daemon, fingerprint: str) -> int:
    """
    How many times the daemon has asked its owners about C{fingerprint}.
    """
    return len(
        re.findall(
            rf"control message approval_requested about {re.escape(fingerprint)}",
            daemon.log(),
        )
    )


def echoSizes(echo: EchoServer) -> list[int]:
    """
    The bytes each connection to the echo server carried, in order.
    """
    return [size for _, size in sorted(echo.received().items())]


def approveHeld(site: Site, daemon: Daemon, name: str) -> None:
    """
    Let C{name} in the owners' way: it connects and is held, alice approves
    it by its fingerprint, and the held connection goes on.  The daemon's
    decision timeout must leave time for that.
    """
    held = site.start_connect(name, daemon)
    requested(daemon, site.fp(name))
    site.decide("approve", site.fp(name))
    assertConnected(finish(held))


def approveLater(site: Site, daemon: Daemon, name: str) -> None:
    """
    Let C{name} in with a daemon whose decision timeout may be too short to
    wait for the owners: it connects (and may be refused with C{pending}),
    alice approves its request, and then it connects.
    """
    held = site.start_connect(name, daemon)
    requested(daemon, site.fp(name))
    site.decide("approve", site.fp(name))
    first = finish(held)
    if first.returncode != 0:
        assertRefused(first, "pending")
        assertConnected(site.connect(name, daemon))
    else:
        assertConnected(first)


def rawKey(site: Site, name: str) -> tuple[str, bytes]:
    """
    The algorithm name and OpenSSH wire-format blob of C{name}'s public key.
    """
    peer = readOwnerKey((site.path(name) / f"{PRIVATE_KEY}.pub").read_text())
    return peer.algorithm, peer.publicKey.blob


def writeStore(path: Path, statement: str, parameters: tuple[Any, ...]) -> None:
    """
    Change a trust store behind the daemon's back, as anyone with write access
    to the file could.
    """
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(statement, parameters)
    finally:
        connection.close()


def test_approveHeldConnection(site: Site, echo: EchoServer) -> None:
    """
    The issue's "done when": an unknown client connects and is held;
    C{dwtrust pending} lists its request (as text and as JSON: ID,
    fingerprint, org/service, source); C{dwtrust approve} with a unique
    prefix of the ID lets that same waiting connection go on, so it prints
    C{hello} and exits 0, and the application gets exactly one connection
    with its 6 bytes.  A second connection passes at once, with no new
    request, and C{dwtrust peers} shows the key approved by alice.
    """
    billing = site.fp("billing")
    with site.daemon(echo) as daemon:
        held = site.start_connect("billing", daemon)
        requested(daemon, billing)
        assert held.poll() is None, "the client was not held"

        [entry] = site.pending()
        assert entry["peer"]["fingerprint"] == billing, entry
        assert (entry["peer"]["organization"], entry["peer"]["service"]) == (
            "acme",
            "billing",
        ), entry
        assert entry["peer"]["algorithm"] == "ssh-ed25519", entry
        assert re.fullmatch(SOURCE, entry["source"]), entry
        assert entry["attempts"] == 1, entry
        requestId = entry["requestId"]
        assert re.fullmatch(r"[0-9a-f]{10}", requestId), entry

        text = site.owner("pending")
        assert text.returncode == 0, describe(text)
        [header, line] = text.stdout.decode().splitlines()
        assert header.split()[:3] == ["ID", "FINGERPRINT", "ORG/SERVICE"], header
        assert line.split()[:5] == [
            requestId,
            billing,
            "acme/billing",
            "ssh-ed25519",
            entry["source"],
        ], line

        # Nothing reached the application while the client waited.
        assert held.poll() is None, "the client was not held"
        assert echo.connections() == 0

        approved = site.decide("approve", requestId[:4])
        assert (
            f"approved acme/billing {billing} (request {requestId}) for {LEDGER},"
            f" signed by {site.fp('alice')}"
        ) in approved, approved
        assertConnected(finish(held))
        assert echo.connections() == 1
        assert echoSizes(echo) == [len(HELLO)]

        assertConnected(site.connect("billing", daemon))
        assert requests(daemon, billing) == 1, daemon.log()
        assert site.pending() == []
        assert site.peers() == {billing: ("approved", site.fp("alice"))}
        authenticated = re.findall(
            rf"authenticated client acme/billing {re.escape(billing)} at {SOURCE}",
            daemon.log(),
        )
        assert len(authenticated) == 2, daemon.log()
    assert echoSizes(echo) == [len(HELLO), len(HELLO)]


def test_deny(site: Site, echo: EchoServer) -> None:
    """
    A held client that an owner denies exits 3 with C{denied}, and the
    application hears nothing of it.  It is refused with C{denied} at once
    from then on, with no new request.
    """
    billing = site.fp("billing")
    with site.daemon(echo) as daemon:
        held = site.start_connect("billing", daemon)
        requested(daemon, billing)
        [entry] = site.pending()
        denied = site.decide("deny", entry["requestId"])
        assert f"denied acme/billing {billing}" in denied, denied
        assertRefused(finish(held), "denied")

        again = site.connect("billing", daemon)
        assertRefused(again, "denied")
        assert requests(daemon, billing) == 1, daemon.log()
        assert site.pending() == []
        assert site.peers() == {billing: ("denied", site.fp("alice"))}
        assert echo.connections() == 0
        assert echo.received() == {}


def test_revokeClosesSession(site: Site, echo: EchoServer) -> None:
    """
    C{dwtrust revoke}, given a prefix of the fingerprint, closes the key's
    open session at once: the client's connection ends (its process exits)
    and the daemon logs the closure.  The key is refused with C{revoked} from
    then on, and it never becomes a pending request again.
    """
    billing = site.fp("billing")
    with site.daemon(echo) as daemon:
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
            assert echoSizes(echo) == [len(HELLO), len(HELLO)]
            assert session.poll() is None, "the session ended by itself"

            revoked = site.decide("revoke", billing[: len("SHA256:") + 8])
            assert f"revoked acme/billing {billing}" in revoked, revoked
            wait_for(
                session.poll,
                "the revoked session to end",
                deadline=DEADLINE,
                why=lambda: daemon.report(),
            )
        finally:
            if session.poll() is None:
                session.kill()
            session.wait(timeout=DEADLINE)
            assert session.stdin is not None
            session.stdin.close()
        daemon.wait_for_log(
            rf"closed 1 session\(s\) of {re.escape(billing)}, now revoked"
        )
        wait_for(lambda: echo.closed() == 2, "the forwarded connection to close")

        assertRefused(site.connect("billing", daemon), "revoked")
        assert site.pending() == []
        assert requests(daemon, billing) == 1, daemon.log()
        assert site.peers() == {billing: ("revoked", site.fp("alice"))}
    assert echoSizes(echo) == [len(HELLO), len(HELLO)]


def test_identityChanged(site: Site, echo: EchoServer) -> None:
    """
    Once acme/billing's key is approved, another key that claims to be
    acme/billing is refused with C{identity_changed}, and C{dwtrust watch
    --json} (watching from before) prints an C{identity_changed} message that
    names both keys.  No request is raised for the new key.
    """
    billing, impostor = site.fp("billing"), site.fp("impostor")
    with site.daemon(echo) as daemon:
        watch = start_session(
            "watch",
            "--control",
            site.control,
            "--identity",
            str(site.path("alice")),
            "--json",
        )
        messages = Lines(watch.stdout)
        errors = Lines(watch.stderr)
        try:
            errors.wait_for(r"watching acme/ledger's control messages")
            approveHeld(site, daemon, "billing")

            changed = site.connect("impostor", daemon)
            assertRefused(changed, "identity_changed")
            messages.wait_for(r'"kind": "identity_changed"')
            daemon.wait_for_log(
                rf"handshake with acme/billing {re.escape(impostor)} at {SOURCE}"
                r" failed \(by us\): identity_changed"
            )
        finally:
            watch.send_signal(signal.SIGINT)
            status = watch.wait(timeout=DEADLINE)
            messages.join()
            errors.join()
        assert status == 0, errors.text()

        seen = [json.loads(line) for line in messages.lines()]
        kinds = [m["kind"] for m in seen]
        assert kinds.count("identity_changed") == 1, seen
        [alert] = [m for m in seen if m["kind"] == "identity_changed"]
        assert alert["peer"]["fingerprint"] == impostor, alert
        assert alert["knownKeys"] == [{"fingerprint": billing}], alert
        assert (alert["peer"]["organization"], alert["peer"]["service"]) == (
            "acme",
            "billing",
        ), alert
        assert alert["service"] == LEDGER, alert
        assert re.fullmatch(SOURCE, alert["source"]), alert
        # The watch saw the approval flow too, and no request for the new key.
        requestsSeen = [
            m["peer"]["fingerprint"] for m in seen if m["kind"] == "approval_requested"
        ]
        assert requestsSeen == [billing], seen

        assert site.pending() == []
        assert requests(daemon, impostor) == 0, daemon.log()
        assert site.peers() == {billing: ("approved", site.fp("alice"))}
        assert echoSizes(echo) == [len(HELLO)]


def test_forgedApprovalRefused(site: Site, echo: EchoServer) -> None:
    """
    Rows written into the store as C{approved} without a valid owner's
    signature let no one in: one with no decision at all, one whose decision
    is signed by a key that is not an owner (bob's), and one with another
    key's genuine approval copied in.  Each such client is treated as
    unknown (held, then refused with C{pending}); the daemon logs a
    C{dwtrust.forged_decision} warning and tells the owners; no byte of
    theirs reaches the application.
    """
    with site.daemon(echo, "--decision-timeout", "2", name="d1") as first:
        port = first.port
        approveLater(site, first, "payroll")
    before = echoSizes(echo)
    now = time.time()
    columns = (
        "fingerprint, org, service, algorithm, public_key, state, first_seen,"
        " last_seen, attempts, source, decided_by, decision"
    )

    def forge(name: str, decision: bytes) -> None:
        algorithm, blob = rawKey(site, name)
        org, service = NAMES[name]
        writeStore(
            site.store,
            f"INSERT INTO peers ({columns})"
            " VALUES (?, ?, ?, ?, ?, 'approved', ?, ?, 1, '10.9.9.9:1', ?, x'')",
            (site.fp(name), org, service, algorithm, blob, now, now, site.fp("alice")),
        )
        if decision:
            writeStore(
                site.store,
                "INSERT INTO decisions VALUES"
                " (?, 1, ?, ?, ?, ?, 'approved', ?, ?, ?, ?)",
                (
                    site.fp(name),
                    org,
                    service,
                    algorithm,
                    blob,
                    site.fp("alice"),
                    site.fp("alice"),
                    now,
                    decision,
                ),
            )

    forge("reports", b"")
    bob = Identity.load(FilePath(str(site.path("bob"))))
    search = readOwnerKey((site.path("search") / f"{PRIVATE_KEY}.pub").read_text())
    forge(
        "search",
        SignedDecision.make(
            bob, LEDGER, search, "approved", now, "ok", site.fp("ledger"), 1
        ).encode(),
    )
    connection = sqlite3.connect(site.store)
    try:
        [(genuine,)] = connection.execute(
            "SELECT decision FROM decisions WHERE fingerprint = ?",
            (site.fp("payroll"),),
        ).fetchall()
    finally:
        connection.close()
    forge("mail", bytes(genuine))
    forged = ["reports", "search", "mail"]

    with site.daemon(echo, "--decision-timeout", "2", port=port, name="d2") as daemon:
        running = {name: site.start_connect(name, daemon) for name in forged}
        results = {name: finish(process) for name, process in running.items()}
        log = daemon.log()
        for name in forged:
            assert re.search(
                rf"REFUSED a stored decision: {re.escape(site.fp(name))} is approved"
                " in the store, but",
                log,
            ), log
        # The genuine approval still stands.
        assertConnected(site.connect("payroll", daemon))
        # Only payroll's connections reached the application.
        assert echoSizes(echo) == [*before, len(HELLO)]
        # Each forged key was treated as unknown: held, then refused as
        # pending, and its owners were asked.
        for name, done in results.items():
            assertRefused(done, "pending")
            assert requests(daemon, site.fp(name)) == 1, f"{name} was not asked about"
    events = site.audited()
    for name in forged:
        for kind in ["dwtrust.forged_decision", "dwtrust.control.forged_decision"]:
            assert any(
                e.get("event") == kind and e.get("fingerprint") == site.fp(name)
                for e in events
            ), f"no {kind} about {name} in the audit log"


def test_pendingSurvivesSIGKILL(site: Site, echo: EchoServer) -> None:
    """
    Pending requests are on disk: with two unknown keys pending (one of them
    having tried twice), the daemon is killed with SIGKILL and restarted on
    the same store, and C{dwtrust pending} lists both requests as they were
    (IDs, fingerprints, attempts).  Approving one then lets that client in.
    """
    billing, payroll = site.fp("billing"), site.fp("payroll")
    with site.daemon(echo, "--decision-timeout", "2", name="d1") as first:
        port = first.port
        running = [site.start_connect(n, first) for n in ["billing", "billing"]]
        running.append(site.start_connect("payroll", first))
        for process in running:
            assertRefused(finish(process), "pending")
        before = {e["peer"]["fingerprint"]: e for e in site.pending()}
        assert set(before) == {billing, payroll}, before
        assert before[billing]["attempts"] == 2, before
        assert before[payroll]["attempts"] == 1, before
        first.kill()
        assert first.returncode == -signal.SIGKILL

    with site.daemon(echo, "--decision-timeout", "2", port=port, name="d2") as daemon:
        after = {e["peer"]["fingerprint"]: e for e in site.pending()}
        fields = ["requestId", "peer", "attempts", "firstSeen"]
        assert {fp: [e[f] for f in fields] for fp, e in after.items()} == {
            fp: [e[f] for f in fields] for fp, e in before.items()
        }
        site.decide("approve", before[billing]["requestId"])
        assertConnected(site.connect("billing", daemon))
        assert [e["peer"]["fingerprint"] for e in site.pending()] == [payroll]
        assert requests(daemon, billing) == 0, daemon.log()
    assert echoSizes(echo) == [len(HELLO)]


def test_flood(site: Site, echo: EchoServer) -> None:
    """
    A flood of unknown keys from one address leaves at most
    C{--max-pending-per-source} requests pending; the keys past the cap are
    refused with C{unavailable} at once.  Meanwhile a known client connects
    as usual, and afterwards the daemon still answers.
    """
    limit = 3
    with site.daemon(
        echo,
        "--max-pending-per-source",
        str(limit),
        "--decision-timeout",
        "6",
    ) as daemon:
        approveLater(site, daemon, "billing")
        before = echoSizes(echo)
        flood = {
            f"flood{n}": site.start_connect(f"flood{n}", daemon) for n in range(FLOOD)
        }
        # The flood is on: some of it is held, waiting for the owners (the
        # first request was billing's).
        wait_for(
            lambda: len(re.findall("approval_requested about", daemon.log())) > 1,
            "the flood to raise requests",
            deadline=30.0,
            why=daemon.report,
        )
        assertConnected(site.connect("billing", daemon))
        stillHeld = [name for name, p in flood.items() if p.poll() is None]
        assert stillHeld, "the known client did not connect during the flood"

        results = {name: finish(process) for name, process in flood.items()}
        outcomes: dict[str, list[str]] = {}
        for name, done in results.items():
            assert done.returncode == 3, describe(done)
            assert done.stdout == b"", describe(done)
            code = re.search(
                r"the server refused this client: (\w+):", done.stderr.decode()
            )
            assert code is not None, describe(done)
            outcomes.setdefault(code.group(1), []).append(name)
        pending = site.pending()
        assert len(pending) <= limit, pending
        # Exactly the first keys up to the cap wait; the rest were turned away.
        assert len(pending) == limit, pending
        assert sorted(outcomes) == ["pending", "unavailable"], outcomes
        assert len(outcomes["pending"]) == len(pending), (outcomes, pending)
        assert {e["peer"]["fingerprint"] for e in pending} == {
            site.fp(n) for n in outcomes["pending"]
        }

        assertConnected(site.connect("billing", daemon))
    assert echoSizes(echo) == [*before, len(HELLO), len(HELLO)]


def test_breakGlassOwner(site: Site, echo: EchoServer) -> None:
    """
    An owner key the daemon does not know is refused on the control channel.
    C{dwtrust add-owner}, run with the service's own key while the daemon is
    stopped, registers it in the store, and after a restart (without
    C{--owner} for it) it can act as an owner.  A registration written into
    the store but signed by another key (alice's) is ignored, and logged.
    """
    bob, bob2 = site.fp("bob"), site.fp("bob2")
    with site.daemon(echo, name="d1") as first:
        port = first.port
        refused = site.owner("pending", who="bob")
        assert refused.returncode == 3, describe(refused)
        assert re.search(rb"not a registered owner|denied", refused.stderr), describe(
            refused
        )
        first.wait_for_log(
            rf"REFUSED acme/bob {re.escape(bob)} from .* on the control channel:"
            " not a registered owner"
        )
        assert site.pending() == []

    added = run_cli(
        "add-owner",
        "--identity",
        str(site.path("ledger")),
        str(site.path("bob") / f"{PRIVATE_KEY}.pub"),
    )
    assert added.returncode == 0, describe(added)
    assert (
        f"registered acme/bob ({bob}) as an owner of {LEDGER}".encode() in added.stdout
    ), describe(added)

    alice = Identity.load(FilePath(str(site.path("alice"))))
    bob2Key = readOwnerKey((site.path("bob2") / f"{PRIVATE_KEY}.pub").read_text())
    forgedRegistration = SignedDecision.make(
        alice,
        LEDGER,
        bob2Key,
        OWNER,
        time.time(),
        "registered owner",
        site.fp("ledger"),
        1,
    )
    writeStore(
        site.store,
        "INSERT INTO owners (fingerprint, registration) VALUES (?, ?)",
        (bob2, forgedRegistration.encode()),
    )

    with site.daemon(echo, port=port, name="d2") as daemon:
        assert "2 owner(s)" in daemon.log(), daemon.log()
        listing = site.listing("pending", who="bob")
        assert listing["pending"] == [], listing
        stillRefused = site.owner("pending", who="bob2")
        assert stillRefused.returncode == 3, describe(stillRefused)
        daemon.wait_for_log(
            rf"REFUSED acme/bob2 {re.escape(bob2)} from .* on the control channel"
        )
        log = daemon.log()
    assert "IGNORED an owner registration in the store" in log, log
    assert any(e.get("event") == "dwtrust.forged_owner" for e in site.audited()), (
        "the ignored owner registration is not in the audit log"
    )


def test_auditLog(site: Site, echo: EchoServer) -> None:
    """
    The audit log holds one JSON object a line: the approval request, the
    owner's decision and the client's authentication, each with its facts,
    and no private key material.
    """
    billing, alice = site.fp("billing"), site.fp("alice")
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
        daemon.wait_for_log(rf"authenticated client acme/billing {re.escape(billing)}")
    text = site.audit.read_text()
    assert site.audit.stat().st_mode & 0o077 == 0, oct(site.audit.stat().st_mode)
    events = site.audited()
    byName: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        byName.setdefault(event.get("event", ""), []).append(event)

    [request] = byName["dwtrust.control.approval_requested"]
    assert request["fingerprint"] == billing, request
    message = request["message"]
    assert (message["org"], message["peerService"]) == ("acme", "billing"), message
    assert message["service"] == LEDGER, message
    assert re.fullmatch(SOURCE, message["source"]), message
    assert re.fullmatch(r"[0-9a-f]{10}", message["requestId"]), message

    [signed] = byName["dwtrust.control.decision"]
    assert (signed["fingerprint"], signed["state"], signed["signer"]) == (
        billing,
        "approved",
        alice,
    ), signed
    assert signed["owner"] == alice, signed
    [decided] = byName["dwtrust.control.decided"]
    assert decided["message"]["state"] == "approved", decided
    assert decided["message"]["decidedBy"] == alice, decided
    [decision] = byName["dwtrust.decision"]
    assert (decision["fingerprint"], decision["decided"], decision["decided_by"]) == (
        billing,
        "approved",
        alice,
    ), decision
    assert re.fullmatch(SOURCE, decision["source"]), decision

    clients = [
        e for e in byName["dwtrust.authenticated"] if e.get("fingerprint") == billing
    ]
    assert len(clients) == 1, clients
    [client] = clients
    assert client["peerRole"] == "client", client
    assert client["peer_name"] == "acme/billing", client
    assert client["algorithm"] == "ssh-ed25519", client
    assert re.fullmatch(SOURCE, client["source"]), client

    assert "PRIVATE KEY" not in text
    for name in ["ledger", "billing", "alice"]:
        secret = (site.path(name) / PRIVATE_KEY).read_text()
        body = [
            line
            for line in secret.splitlines()
            if line and not line.startswith("-----")
        ]
        assert body, secret
        assert "".join(body) not in text
        for line in body:
            assert line not in text, f"a line of {name}'s private key is logged"
        raw = base64.b64decode("".join(body))
        assert base64.b64encode(raw).decode() not in text
