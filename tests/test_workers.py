"""
C{twistd dwtrust --workers N}: several processes serving one daemon's ports
on one trust store, with real C{twistd} and C{dwtrust} processes on
127.0.0.1; and the SQLite store's change events that tie them together.

Which process holds a connection is read from the kernel: the sockets each
process has open (C{/proc/PID/fd}) that are established connections to the
daemon's port (C{/proc/net/tcp}).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust._workers import WorkersError, workerCount
from dwtrust.store import KeyRecord, KeyState, SQLiteStore, StoreChange

from .processes import (
    DEADLINE,
    PRIVATE_KEY,
    Daemon,
    EchoServer,
    Lines,
    connect,
    describe,
    fingerprint_in,
    finish,
    run_cli,
    run_twistd,
    start_cli,
    start_session,
    wait_for,
)
from .test_authority import DecisionsTestCase, Session
from .test_store import peerIdentity, temporaryDirectory

HELLO = b"hello\n"
#: How many connections a test makes at most to find one in each process.
ATTEMPTS = 24
NAMES = {
    "ledger": ("acme", "ledger"),
    "alice": ("acme", "alice"),
    "billing": ("acme", "billing"),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
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
    found = {}
    for name, process in running.items():
        done = finish(process)
        assert done.returncode == 0, describe(done)
        found[name] = (base / name, fingerprint_in(done.stdout.decode()))
    return found


class Site:
    def __init__(self, base: Path, made: dict[str, tuple[Path, str]]) -> None:
        self.base = base
        self.fingerprints = {name: fp for name, (_, fp) in made.items()}
        for name, (directory, _) in made.items():
            shutil.copytree(directory, base / name)
        self.control = f"unix:{base / 'ledger' / 'control.sock'}"
        self.audit = base / "audit.jsonl"

    def path(self, name: str) -> Path:
        return self.base / name

    def fp(self, name: str) -> str:
        return self.fingerprints[name]

    def daemon(self, echo: EchoServer, *options: str, workers: int = 2) -> Daemon:
        return Daemon(
            self.base / "daemon",
            "--identity",
            str(self.path("ledger")),
            "--owner",
            str(self.path("alice") / f"{PRIVATE_KEY}.pub"),
            "--forward",
            echo.forward,
            "--audit-log",
            str(self.audit),
            "--workers",
            str(workers),
            *options,
        )

    def decide(self, command: str, target: str) -> str:
        done = run_cli(
            command,
            "--control",
            self.control,
            "--identity",
            str(self.path("alice")),
            target,
        )
        assert done.returncode == 0, describe(done)
        return done.stdout.decode()

    def audited(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def start_connect(self, daemon: Daemon) -> subprocess.Popen[bytes]:
        return start_cli(
            "connect",
            "--identity",
            str(self.path("billing")),
            # Held while the test finds a connection for each process.
            "--timeout",
            "200",
            daemon.address,
            input=HELLO,
        )


@pytest.fixture
def site(tmp_path: Path, made: dict[str, tuple[Path, str]]) -> Site:
    return Site(tmp_path, made)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def workerPid(daemon: Daemon, number: int = 1, other: int | None = None) -> int:
    """
    The pid of worker C{number}, from its C{serving} line (one other than
    C{other}, for a worker started again).
    """

    def serving() -> int | None:
        for pid in re.findall(
            rf"dwtrust: worker {number} \(pid (\d+)\) serving", daemon.log()
        ):
            if int(pid) != other:
                return int(pid)
        return None

    return wait_for(serving, f"worker {number} to serve", why=daemon.report)


def mainPid(daemon: Daemon) -> int:
    return int(daemon.pidfile.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: it is only not reaped yet.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] != "Z"


def established(port: int, pids: list[int]) -> dict[int, int]:
    """
    How many established TCP connections to 127.0.0.1:C{port} each of
    C{pids} holds open.
    """
    inodes: dict[str, int] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.split(":")[1], 16) == port:
                inodes[inode] = 0
    counts = {}
    for pid in pids:
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            match = re.fullmatch(r"socket:\[(\d+)\]", target)
            if match and match.group(1) in inodes:
                count += 1
        counts[pid] = count
    return counts


def heldInEach(
    daemon: Daemon, start: Any, pids: list[int]
) -> list[subprocess.Popen[bytes]]:
    """
    Start connections with C{start} one at a time, each waited for until
    the daemon holds it, until every process in C{pids} holds one.
    """
    clients: list[subprocess.Popen[bytes]] = []
    for _ in range(ATTEMPTS):
        clients.append(start())
        wait_for(
            lambda: (
                sum(established(daemon.port, pids).values()) >= len(clients) or None
            ),
            f"the daemon to hold {len(clients)} connection(s)",
            why=daemon.report,
        )
        if all(established(daemon.port, pids).values()):
            return clients
    raise AssertionError(
        f"{ATTEMPTS} connections never reached every process:"
        f" {established(daemon.port, pids)}\n{daemon.report()}"
    )


def test_approvalReleasesHeldInEveryWorker(site: Site, echo: EchoServer) -> None:
    """
    With C{--workers 2}, an unknown client's connections are held in both
    processes (the kernel says which process holds each), and one approval
    through the control channel releases all of them.
    """
    billing = site.fp("billing")
    with site.daemon(
        echo, "--decision-timeout", "120", "--max-waiting-per-new-key", "32"
    ) as daemon:
        pids = [mainPid(daemon), workerPid(daemon)]
        clients = heldInEach(daemon, lambda: site.start_connect(daemon), pids)
        assert all(c.poll() is None for c in clients), "a client was not held"
        approved = site.decide("approve", billing)
        assert f"approved acme/billing {billing}" in approved, approved
        for client in clients:
            done = finish(client)
            assert (done.returncode, done.stdout) == (0, HELLO), describe(done)
        authenticated = {
            e.get("worker_pid", pids[0])
            for e in site.audited()
            if e["event"] == "dwtrust.authenticated" and e["fingerprint"] == billing
        }
        assert authenticated == set(pids), authenticated


def test_revocationClosesSessionsInEveryWorker(site: Site, echo: EchoServer) -> None:
    """
    Sessions of one key open in both processes all end when an owner
    revokes the key through the main process, and each process logs it.
    """
    billing = site.fp("billing")
    with site.daemon(echo, "--decision-timeout", "120") as daemon:
        pids = [mainPid(daemon), workerPid(daemon)]
        first = site.start_connect(daemon)
        wait_for(
            lambda: sum(established(daemon.port, pids).values()) or None,
            "the first connection to be held",
            why=daemon.report,
        )
        site.decide("approve", billing)
        assert finish(first).returncode == 0

        def session() -> subprocess.Popen[bytes]:
            process = start_session(
                "connect", "--identity", str(site.path("billing")), daemon.address
            )
            assert process.stdin is not None
            process.stdin.write(HELLO)
            process.stdin.flush()
            Lines(process.stdout).wait_for(r"^hello$")
            return process

        sessions = heldInEach(daemon, session, pids)
        try:
            assert all(s.poll() is None for s in sessions)
            site.decide("revoke", billing)
            for s in sessions:
                wait_for(
                    lambda s=s: s.poll() is not None or None,  # type: ignore[misc]
                    "a revoked session to end",
                    why=daemon.report,
                )
        finally:
            for s in sessions:
                if s.poll() is None:
                    s.kill()
                s.wait(timeout=DEADLINE)
        closed = rf"closed \d+ session\(s\) of {re.escape(billing)}, now revoked"
        daemon.wait_for_log(rf"\[worker 1\] dwtrust: {closed}")
        lines = [line for line in daemon.log().splitlines() if re.search(closed, line)]
        assert [line for line in lines if "[worker 1]" not in line], lines
        assert established(daemon.port, pids) == {pid: 0 for pid in pids}


def test_bothProcessesServe(site: Site, echo: EchoServer) -> None:
    """
    With C{--workers 2}, connections are served by the main process and by
    the worker (the audit log names the worker that served one), and both
    echo through to the application; the status endpoint names both.
    """
    billing = site.fp("billing")
    with site.daemon(
        echo, "--allow", billing, "--status", "tcp:0:interface=127.0.0.1"
    ) as daemon:
        worker = workerPid(daemon)
        url = daemon.wait_for_log(r"status, health and metrics on http://(\S+)/status")
        with urllib.request.urlopen(
            f"http://{url.group(1)}/status", timeout=DEADLINE
        ) as response:
            status = json.loads(response.read())
        assert status["workers"] == {"main": mainPid(daemon), "workers": [worker]}
        served: set[int] = set()
        for _ in range(ATTEMPTS):
            result = connect(site.path("billing"), daemon.address)
            assert (result.status, result.stdout) == (0, HELLO), str(result)
            served = {
                e.get("worker_pid", 0)
                for e in site.audited()
                if e["event"] == "dwtrust.authenticated"
            }
            if served == {0, worker}:
                break
        assert served == {0, worker}, served
        events = [e for e in site.audited() if e.get("worker_pid") == worker]
        assert all(e["worker"] == 1 for e in events), events


def test_workerKilledIsRestarted(site: Site, echo: EchoServer) -> None:
    """
    A worker killed (SIGKILL) is reported and started again, and the daemon
    serves meanwhile and afterwards.
    """
    billing = site.fp("billing")
    with site.daemon(echo, "--allow", billing) as daemon:
        first = workerPid(daemon)
        os.kill(first, signal.SIGKILL)
        daemon.wait_for_log(rf"worker 1 \(pid {first}\) ended: .*starting it again")
        second = workerPid(daemon, other=first)
        assert second != first and alive(second)
        for _ in range(4):
            result = connect(site.path("billing"), daemon.address)
            assert (result.status, result.stdout) == (0, HELLO), str(result)


def test_noOrphans(site: Site, echo: EchoServer) -> None:
    """
    Stopping the daemon stops its workers; a main process that is killed
    outright takes its workers with it too (their lifeline ends).
    """
    with site.daemon(echo) as daemon:
        worker = workerPid(daemon)
    wait_for(lambda: not alive(worker), "the worker to end after the daemon")
    with site.daemon(echo) as daemon:
        worker = workerPid(daemon)
        daemon.kill()
        wait_for(lambda: not alive(worker), "the worker to end after a SIGKILL")


def test_reloadReachesWorkers(site: Site, echo: EchoServer) -> None:
    """
    SIGHUP to the main process reloads the workers too.
    """
    with site.daemon(echo) as daemon:
        workerPid(daemon)
        os.kill(mainPid(daemon), signal.SIGHUP)
        daemon.wait_for_log(r"\[worker 1\] dwtrust: reloaded: 1 owner")


def test_badWorkers(tmp_path: Path) -> None:
    """
    A --workers value that is not a count of processes is refused in one
    line, with the usage status.
    """
    for value in ("0", "two"):
        done = run_twistd(
            "-n",
            "dwtrust",
            "--identity",
            str(tmp_path / "id"),
            "--workers",
            value,
            cwd=tmp_path,
        )
        assert done.returncode == 2, describe(done)
        lines = done.stderr.decode().strip().splitlines()
        assert "--workers" in lines[0] and "Traceback" not in done.stderr.decode(), (
            describe(done)
        )


class WorkerCountTests(SynchronousTestCase):
    def test_counts(self) -> None:
        self.assertEqual(workerCount("3"), 3)
        self.assertEqual(workerCount("auto"), len(os.sched_getaffinity(0)))

    def test_refused(self) -> None:
        for value in ("0", "-1", "many", ""):
            self.assertRaises(WorkersError, workerCount, value)


class SQLiteEventsTests(TestCase):
    """
    Two store objects on one SQLite file, as two processes have: each tells
    its watchers of the other's changes, and of its own as its own.
    """

    def setUp(self) -> Deferred[None]:
        self.path = temporaryDirectory(self).child("trust.sqlite3")

        async def opened() -> None:
            self.one = await SQLiteStore.open(self.path)
            self.other = await SQLiteStore.open(self.path)
            self.addCleanup(self.one.close)
            self.addCleanup(self.other.close)

        return ensureDeferred(opened())

    def watched(self, store: SQLiteStore) -> list[StoreChange]:
        changes: list[StoreChange] = []
        self.addCleanup(store.watch(changes.append))
        return changes

    async def until(self, changes: list[StoreChange], count: int) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for _ in range(200):
            if len(changes) >= count:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"only {changes} after waiting")

    def test_otherProcessChanges(self) -> Deferred[None]:
        """
        A decision, a new pending request and an owner stored through one
        store reach the other's watchers, once each, as not local.
        """

        async def run() -> None:
            changes = self.watched(self.one)
            await self.until([], 0)
            # Let the first look at the file happen.
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            await deferLater(reactor, 0.5, lambda: None)
            peer = peerIdentity()
            await self.other.addPending(peer, "10.0.0.1:1", "r1", 1e12, 10, 10)
            await self.until(changes, 1)
            await self.other.record(peer, KeyState.approved, "10.0.0.1:1", "alice")
            await self.other.addOwner("SHA256:owner", b"registration")
            await self.until(changes, 3)
            await deferLater(reactor, 0.6, lambda: None)
            self.assertEqual(
                [(c.kind, c.fingerprint, c.local) for c in changes],
                [
                    ("pending", peer.fingerprint, False),
                    ("decided", peer.fingerprint, False),
                    ("owner", "SHA256:owner", False),
                ],
            )
            self.assertEqual(changes[1].record.state, KeyState.approved)  # type: ignore[union-attr]

        return ensureDeferred(run())

    def test_ownChangesAreLocal(self) -> Deferred[None]:
        """
        A store's own changes reach its watchers once, as local, even once
        another process has written too.
        """

        async def run() -> None:
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            changes = self.watched(self.one)
            await deferLater(reactor, 0.5, lambda: None)
            peer = peerIdentity()
            await self.one.addPending(peer, "10.0.0.1:1", "r1", 1e12, 10, 10)
            await self.one.record(peer, KeyState.approved, "10.0.0.1:1", "alice")
            other = peerIdentity("acme", "payroll")
            await self.other.record(other, KeyState.denied, "10.0.0.2:1", "alice")
            await self.until(changes, 3)
            await deferLater(reactor, 0.6, lambda: None)
            self.assertEqual(
                [(c.kind, c.fingerprint, c.local) for c in changes],
                [
                    ("pending", peer.fingerprint, True),
                    ("decided", peer.fingerprint, True),
                    ("decided", other.fingerprint, False),
                ],
            )

        return ensureDeferred(run())


def test_sidecarInEveryWorker(tmp_path: Path, site: Site, echo: EchoServer) -> None:
    """
    A client sidecar's local port (C{--connect}) is served by every process
    too: plain connections to it reach the remote daemon through the main
    process and through the worker.
    """
    import socket

    audit = tmp_path / "sidecar-audit.jsonl"
    with (
        Daemon(
            tmp_path / "remote",
            "--identity",
            str(site.path("ledger")),
            "--forward",
            echo.forward,
            "--allow",
            site.fp("billing"),
        ) as remote,
        Daemon(
            tmp_path / "sidecar",
            "--identity",
            str(site.path("billing")),
            "--connect",
            f"tcp:0:interface=127.0.0.1={remote.address}",
            "--audit-log",
            str(audit),
            "--workers",
            "2",
            listen=False,
        ) as sidecar,
    ):
        worker = workerPid(sidecar)
        local = sidecar.port_of("SidecarFactory")
        served: set[int] = set()
        for _ in range(ATTEMPTS):
            with socket.create_connection(("127.0.0.1", local), timeout=DEADLINE) as c:
                c.sendall(HELLO)
                assert c.recv(1024) == HELLO
            served = {
                e.get("worker_pid", 0)
                for e in (json.loads(line) for line in audit.read_text().splitlines())
                if e["event"] == "dwtrust.authenticated"
            }
            if served == {0, worker}:
                break
        assert served == {0, worker}, served


def test_workerRequestReachesOwners(
    tmp_path: Path, site: Site, echo: EchoServer
) -> None:
    """
    A request raised in a worker (an unknown key whose connection the
    worker holds) reaches an owner watching the main process's control
    channel.
    """
    from dwtrust import Identity

    with site.daemon(echo, "--decision-timeout", "120") as daemon:
        worker = workerPid(daemon)
        watch = start_session(
            "watch", "--control", site.control, "--identity", str(site.path("alice"))
        )
        shown, said = Lines(watch.stdout), Lines(watch.stderr)
        clients: list[subprocess.Popen[bytes]] = []
        try:
            said.wait_for(r"watching")
            for number in range(ATTEMPTS):
                stranger = Identity.generate("acme", f"stranger{number}")
                stranger.save(FilePath(str(tmp_path / f"stranger{number}")))
                before = established(daemon.port, [worker])[worker]
                clients.append(
                    start_cli(
                        "connect",
                        "--identity",
                        str(tmp_path / f"stranger{number}"),
                        "--timeout",
                        "200",
                        daemon.address,
                        input=HELLO,
                    )
                )
                wait_for(
                    lambda: (
                        sum(
                            established(daemon.port, [mainPid(daemon), worker]).values()
                        )
                        >= len(clients)
                        or None
                    ),
                    "the daemon to hold the connection",
                    why=daemon.report,
                )
                if established(daemon.port, [worker])[worker] > before:
                    shown.wait_for(re.escape(stranger.fingerprint))
                    break
            else:
                raise AssertionError(
                    f"no connection reached the worker\n{daemon.report()}"
                )
        finally:
            for process in [*clients, watch]:
                if process.poll() is None:
                    process.kill()
                process.communicate(timeout=DEADLINE)


class ReadFirstTests(DecisionsTestCase):
    """
    Another process's decision that a connection's check here read from the
    store before the store's change event came (and so only remembered) is
    still put in force when the event comes: workers share one store, and
    a key's next connection may reach a worker before the change does.
    """

    def storedElsewhere(self, state: str, sequence: int) -> KeyRecord:
        decision = self.sign(state, sequence)
        self.successResultOf(
            self.store.record(
                self.billing,
                KeyState(state),
                "10.1.1.1:1",
                self.alice.fingerprint,
                decision.encode(),
                sequence,
            )
        )
        record = self.lookup()
        self.successResultOf(self.decisions.current(record))
        return record

    def changed(self, record: KeyRecord) -> None:
        self.successResultOf(
            self.decisions.fromFleet(
                StoreChange("decided", self.billing.fingerprint, record, False)
            )
        )

    def test_revocation(self) -> None:
        """
        The key's sessions here close.
        """
        self.apply(self.sign("approved", 1))
        session = Session()
        self.sessions[self.billing.fingerprint] = [session]
        record = self.storedElsewhere("revoked", 2)
        self.assertFalse(session.aborted)
        self.changed(record)
        self.assertTrue(session.aborted)

    def test_approval(self) -> None:
        """
        The connections held here for the key are released.
        """
        waiting = self.bus.waitFor(self.billing.fingerprint)
        record = self.storedElsewhere("approved", 1)
        self.assertNoResult(waiting)
        self.changed(record)
        self.assertEqual(self.successResultOf(waiting).state, "approved")
