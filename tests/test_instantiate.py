"""
Tests for microclients instantiating microservers (S8):
L{dwtrust.provisioning.instantiate} in process, and C{dwtrust instantiate}
with the real daemon and the real client, on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import (
    ApprovalPolicy,
    ErrorCode,
    Identity,
    IdentityError,
    PeerIdentity,
    PinningPolicy,
    Refusal,
)
from dwtrust._decision import SignedDecision, Signers
from dwtrust.approval import KnownOnlyApprover
from dwtrust.provisioning import instantiate, servicePin
from dwtrust.store import KeyState, SQLiteStore, StoreError
from dwtrust.testing import MemoryTrustStore

from .processes import (
    PRIVATE_KEY,
    STORE,
    Connected,
    Daemon,
    EchoServer,
    connect,
    describe,
    keygen,
    run_cli,
)

HELLO = b"hello\n"


def temporaryDirectory(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new, empty directory, removed when C{case} ends.
    """
    path = tempfile.mkdtemp(prefix="dwtrust-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return FilePath(path)


class InstantiateTests(TestCase):
    """
    L{instantiate} makes the server's identity, approves the client's key in
    the server's store with a decision signed by the server's own key, and
    pins the server's key in the client's store.
    """

    def setUp(self) -> None:
        self.base = temporaryDirectory(self)
        self.client = Identity.generate("acme", "cli")
        self.clientStore = self.base.child("client.sqlite3")
        self.serverDirectory = self.base.child("server")

    async def test_installsBothKeys(self) -> None:
        """
        The server's store holds the client's key as approved, decided by
        C{instantiate}, with a signed decision that verifies against the
        server's key (and that the server's L{ApprovalPolicy} accepts); the
        client's store pins the server's key as C{service:ORG/SERVICE}; and
        the saved identity is the one returned.
        """
        server = await instantiate(
            self.client,
            self.clientStore,
            self.serverDirectory,
            "acme",
            "ledger",
        )
        self.assertEqual(Identity.load(self.serverDirectory), server)
        self.assertEqual(server.name, "acme/ledger")

        store = await SQLiteStore.open(self.serverDirectory.child(STORE))
        try:
            record = await store.lookup(self.client.fingerprint)
        finally:
            await store.close()
        assert record is not None
        self.assertIs(record.state, KeyState.approved)
        self.assertEqual(
            (record.org, record.service, record.decidedBy),
            ("acme", "cli", "instantiate"),
        )
        decision = SignedDecision.decode(record.decision)
        Signers([server.publicKey]).verify(decision, server.name, server.fingerprint)
        self.assertEqual(decision.signer, server.fingerprint)
        self.assertEqual(decision.reason, "installed by instantiate")
        policy = ApprovalPolicy(store, KnownOnlyApprover(), server)
        self.assertIsNotNone(policy.decisions.verify(record))

        pins = await SQLiteStore.open(self.clientStore)
        try:
            pin = await pins.pinned(servicePin("acme", "ledger"))
        finally:
            await pins.close()
        assert pin is not None
        self.assertEqual(pin.address, "service:acme/ledger")
        self.assertEqual(
            (pin.org, pin.service, pin.fingerprint),
            ("acme", "ledger", server.fingerprint),
        )

    async def test_algorithm(self) -> None:
        """
        The server's key is of the algorithm asked for.
        """
        server = await instantiate(
            self.client,
            self.clientStore,
            self.serverDirectory,
            "acme",
            "ledger",
            "ecdsa-p256",
        )
        self.assertEqual(server.algorithm.name, "ecdsa-sha2-nistp256")

    async def test_refusesExistingIdentity(self) -> None:
        """
        A directory that already holds an identity is refused, and left as
        it was; the client's store gets no pin.
        """
        existing = Identity.generate("acme", "ledger")
        existing.save(self.serverDirectory)
        before = {
            child.basename(): child.getContent()
            for child in self.serverDirectory.children()
        }
        with self.assertRaises(IdentityError) as raised:
            await instantiate(
                self.client,
                self.clientStore,
                self.serverDirectory,
                "acme",
                "ledger",
            )
        self.assertIn("already holds an identity", str(raised.exception))
        after = {
            child.basename(): child.getContent()
            for child in self.serverDirectory.children()
        }
        self.assertEqual(before, after)
        self.assertFalse(self.clientStore.exists())

    async def test_refusesExistingStore(self) -> None:
        """
        A directory that already holds a trust store is refused.
        """
        self.serverDirectory.makedirs()
        self.serverDirectory.child(STORE).setContent(b"")
        with self.assertRaises(IdentityError):
            await instantiate(
                self.client,
                self.clientStore,
                self.serverDirectory,
                "acme",
                "ledger",
            )
        self.assertEqual(
            [c.basename() for c in self.serverDirectory.children()], [STORE]
        )

    async def test_badNamesLeaveNothing(self) -> None:
        """
        A name or algorithm that is not allowed is refused before anything is
        written, in the server's directory or the client's store.
        """
        for org, service, algorithm in [
            ("Acme", "ledger", "ed25519"),
            ("acme", "", "ed25519"),
            ("acme", "ledger/x", "ed25519"),
            ("acme", "ledger", "dsa"),
        ]:
            with self.assertRaises(IdentityError):
                await instantiate(
                    self.client,
                    self.clientStore,
                    self.serverDirectory,
                    org,
                    service,
                    algorithm,
                )
            self.assertFalse(self.serverDirectory.exists())
            self.assertFalse(self.clientStore.exists())

    async def test_failureRemovesServer(self) -> None:
        """
        If installing the server's key in the client's store fails, the new
        server's identity and store are removed again.
        """
        # A directory where the client's store file should be: SQLite cannot
        # open it.
        self.clientStore.makedirs()
        with self.assertRaises(StoreError):
            await instantiate(
                self.client,
                self.clientStore,
                self.serverDirectory,
                "acme",
                "ledger",
            )
        self.assertFalse(self.serverDirectory.exists())


def peerIdentity(org: str = "acme", service: str = "ledger") -> PeerIdentity:
    identity = Identity.generate(org, service)
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


class ServicePinTests(SynchronousTestCase):
    """
    A client's L{PinningPolicy} with a server pinned under
    C{service:ORG/SERVICE}, as L{instantiate} leaves it.
    """

    def setUp(self) -> None:
        self.store = MemoryTrustStore(now=lambda: 1000.0)
        self.server = peerIdentity()
        self.successResultOf(self.store.pin(servicePin("acme", "ledger"), self.server))

    def test_strictAdmitsServicePin(self) -> None:
        """
        Even in strict mode, the server with the pinned key passes at an
        address never dialled before, and is pinned there too.
        """
        self.assertIsNone(
            self.successResultOf(
                PinningPolicy(self.store, strict=True).check(
                    self.server, "127.0.0.1:8443"
                )
            )
        )
        self.assertEqual(
            self.store.pins["127.0.0.1:8443"].fingerprint, self.server.fingerprint
        )

    def test_otherKeyIdentityChanged(self) -> None:
        """
        Another key claiming the pinned C{org/service} is refused with
        C{identity_changed}, strict or not, and is pinned nowhere.
        """
        for strict in [False, True]:
            impostor = peerIdentity()
            failure = self.failureResultOf(
                PinningPolicy(self.store, strict=strict).check(
                    impostor, "127.0.0.1:8443"
                ),
                Refusal,
            )
            self.assertIs(failure.value.code, ErrorCode.identity_changed)
            self.assertIn("service:acme/ledger", failure.value.message)
        self.assertEqual(list(self.store.pins), ["service:acme/ledger"])

    def test_otherServiceStillStrict(self) -> None:
        """
        The pin vouches for its own C{org/service} only: another server is
        still refused in strict mode.
        """
        failure = self.failureResultOf(
            PinningPolicy(self.store, strict=True).check(
                peerIdentity("acme", "billing"), "127.0.0.1:8443"
            ),
            Refusal,
        )
        self.assertIs(failure.value.code, ErrorCode.denied)


def assertConnected(result: Connected) -> None:
    assert (result.status, result.stdout) == (0, HELLO), str(result)


def assertRefused(result: Connected, *texts: str) -> None:
    assert result.status == 3, str(result)
    assert result.stdout == b"", str(result)
    for text in texts:
        assert text in result.stderr, f"{text!r} not in:\n{result}"


def dwtrustInstantiate(client: Path, server: Path, *more: str) -> str:
    """
    C{dwtrust instantiate} for C{client}, making C{server} as C{acme/ledger};
    return what it printed.
    """
    done = run_cli(
        "instantiate",
        "--identity",
        str(client),
        "--server-identity",
        str(server),
        "--org",
        "acme",
        "--service",
        "ledger",
        *more,
    )
    assert done.returncode == 0, describe(done)
    return done.stdout.decode()


def test_microclient(tmp_path: Path) -> None:
    """
    The issue's test: a microclient made with C{dwtrust keygen} instantiates
    a microserver with C{dwtrust instantiate}.  Against the daemon with
    C{--approver known-only} (which refuses any key needing approval), the
    client in C{--strict} mode (which refuses any server it does not know)
    connects the first time and gets its echo: no approval was needed in
    either direction.  A different client key, even one claiming the same
    name, is still subject to trust on first use: refused.
    """
    client, server = tmp_path / "client", tmp_path / "server"
    clientKey = keygen(client, "acme", "cli")
    printed = dwtrustInstantiate(client, server)
    serverKey = json.loads((server / "identity.json").read_text())
    assert serverKey["org"] == "acme" and serverKey["service"] == "ledger"
    serverFingerprint = re.search(r"^fingerprint:\s+(\S+)$", printed, re.M)
    assert serverFingerprint is not None, printed
    assert clientKey in printed, printed
    assert "service:acme/ledger" in printed, printed
    assert (server / PRIVATE_KEY).exists()

    other = tmp_path / "other"
    keygen(other, "acme", "other")
    impostor = tmp_path / "impostor"
    keygen(impostor, "acme", "cli")
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path / "daemon",
            "--identity",
            str(server),
            "--forward",
            echo.forward,
            "--approver",
            "known-only",
        ) as daemon,
    ):
        first = connect(client, daemon.address, "--strict", input=HELLO)
        assertConnected(first)
        assert clientKey in daemon.log(), daemon.report()
        # ... and pinned under the address it dialled, too.
        again = connect(client, daemon.address, "--strict", input=HELLO)
        assertConnected(again)

        # Another client key is not approved: it would need approval, which
        # known-only refuses.
        assertRefused(connect(other, daemon.address, input=HELLO), "denied")
        # Nor does claiming the microclient's name help.
        assertRefused(
            connect(impostor, daemon.address, input=HELLO), "identity_changed"
        )
    assert echo.received() and sorted(echo.received().values()) == [6, 6]

    # The client's store pins the server under the pseudo-address and the
    # address it dialled; the server's store approved only the microclient.
    connection = sqlite3.connect(f"file:{client / STORE}?mode=ro", uri=True)
    try:
        pins = dict(
            connection.execute("SELECT address, fingerprint FROM known_services")
        )
    finally:
        connection.close()
    assert pins == {
        "service:acme/ledger": serverFingerprint.group(1),
        daemon.address: serverFingerprint.group(1),
    }, pins


def test_otherClientGoesPending(tmp_path: Path) -> None:
    """
    With owners deciding (the default approver) and an owner registered, a
    different client's key is held as a pending request for the owners,
    while the microclient connects at once.
    """
    client, server = tmp_path / "client", tmp_path / "server"
    keygen(client, "acme", "cli")
    dwtrustInstantiate(client, server)
    owner = tmp_path / "owner"
    keygen(owner, "acme", "alice")
    other = tmp_path / "other"
    otherKey = keygen(other, "acme", "other")
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path / "daemon",
            "--identity",
            str(server),
            "--forward",
            echo.forward,
            "--approver",
            "owners",
            "--owner",
            str(owner / f"{PRIVATE_KEY}.pub"),
            "--decision-timeout",
            "1",
        ) as daemon,
    ):
        assertConnected(connect(client, daemon.address, "--strict", input=HELLO))
        assertRefused(connect(other, daemon.address, input=HELLO), "pending")
        daemon.wait_for_log(re.escape(otherKey))


def test_cliRefusesExistingServer(tmp_path: Path) -> None:
    """
    C{dwtrust instantiate} exits 1 with a clear message if the server's
    directory already holds an identity, or if a name is not allowed, and
    then writes nothing.
    """
    client, server = tmp_path / "client", tmp_path / "server"
    keygen(client, "acme", "cli")
    keygen(server, "acme", "ledger")
    done = run_cli(
        "instantiate",
        "--identity",
        str(client),
        "--server-identity",
        str(server),
        "--org",
        "acme",
        "--service",
        "ledger",
    )
    assert done.returncode == 1, describe(done)
    assert b"already holds an identity" in done.stderr, describe(done)
    assert not (client / STORE).exists()

    fresh = tmp_path / "fresh"
    done = run_cli(
        "instantiate",
        "--identity",
        str(client),
        "--server-identity",
        str(fresh),
        "--org",
        "Acme",
        "--service",
        "ledger",
    )
    assert done.returncode == 1, describe(done)
    assert b"organization name 'Acme' is not allowed" in done.stderr, describe(done)
    assert not fresh.exists()
    assert not (client / STORE).exists()

    done = run_cli("instantiate", "--identity", str(client), "--org", "acme")
    assert done.returncode == 2, describe(done)
    assert b"--server-identity is required" in done.stderr, describe(done)
