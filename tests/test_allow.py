"""
The static allow-list approver: C{--allow} entries read in process, the
L{AllowList} approver on its own and behind an L{ApprovalPolicy}, and a
real daemon that approves a listed key, passes another on to the next
approver, refuses bad entries in one line, and reads its list again on
C{SIGHUP}.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from dwtrust import ApprovalPolicy, Identity, PeerIdentity
from dwtrust._machine import Refusal
from dwtrust.approval import AllowList, ApprovalRequest, readAllowEntries
from dwtrust.store import KeyState, SQLiteStore

from .processes import EchoServer, describe, run_cli, run_twistd
from .test_status import HELLO, ledger_daemon, make_identity, public_key


def peer(identity: Identity) -> PeerIdentity:
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


class EntriesTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dwallow-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.billing = make_identity(self.directory / "billing", "acme", "billing")
        self.payroll = make_identity(self.directory / "payroll", "acme", "payroll")

    def test_forms(self) -> None:
        """
        An entry is a fingerprint, a public-key file, or a file of keys and
        fingerprints with blank lines and C{#} comments.
        """
        listing = self.directory / "allowed"
        listing.write_text(
            "# the reports job\n\n"
            f"  {self.payroll.publicKey.openssh('acme/payroll')}  \n"
            f"{self.billing.fingerprint} billing, by fingerprint\n"
        )
        self.assertEqual(
            readAllowEntries([str(listing)]),
            {self.billing.fingerprint, self.payroll.fingerprint},
        )
        self.assertEqual(
            readAllowEntries([public_key(self.directory / "billing")]),
            {self.billing.fingerprint},
        )
        self.assertEqual(
            readAllowEntries([self.payroll.fingerprint]), {self.payroll.fingerprint}
        )

    def test_badLine(self) -> None:
        """
        A line that is neither a key nor a whole fingerprint is refused in
        one line naming the file and the line.
        """
        listing = self.directory / "allowed"
        listing.write_text(f"{self.billing.fingerprint}\n# fine\nssh-ed25519 AAAA\n")
        with self.assertRaises(ValueError) as caught:
            readAllowEntries([str(listing)])
        message = str(caught.exception)
        self.assertIn(f"--allow {listing}, line 3: not an OpenSSH public key", message)
        self.assertNotIn("\n", message)

    def test_badEntries(self) -> None:
        """
        A short fingerprint, or a file that cannot be read, is refused.
        """
        with self.assertRaises(ValueError) as caught:
            readAllowEntries(["SHA256:abc"])
        self.assertIn("is not a whole SHA256: fingerprint", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            readAllowEntries([str(self.directory / "missing")])
        self.assertIn(
            "cannot read it (No such file or directory)", str(caught.exception)
        )
        with self.assertRaises(ValueError):
            AllowList(["SHA256:abc"])


class AllowListTests(TestCase):
    def test_approvesListedOnly(self) -> None:
        """
        A listed key is approved; any other key is passed on (L{None}).
        """
        billing = Identity.generate("acme", "billing")
        payroll = Identity.generate("acme", "payroll")
        allow = AllowList([billing.fingerprint])
        listed = self.successResultOf(
            allow.requestApproval(ApprovalRequest(peer(billing), "h:1", "acme/ledger"))
        )
        assert listed is not None
        self.assertTrue(listed.approved)
        self.assertTrue(listed.remember)
        self.assertEqual(listed.decidedBy, "allow")
        other = allow.requestApproval(
            ApprovalRequest(peer(payroll), "h:1", "acme/ledger")
        )
        self.assertIsNone(self.successResultOf(other))

    async def _policy(self) -> None:
        directory = FilePath(tempfile.mkdtemp(prefix="dwallow-"))
        self.addCleanup(shutil.rmtree, directory.path, True)
        service = Identity.generate("acme", "ledger")
        billing = Identity.generate("acme", "billing")
        payroll = Identity.generate("acme", "payroll")
        store = await SQLiteStore.open(directory.child("trust.sqlite3"))
        try:
            policy = ApprovalPolicy(store, AllowList([billing.fingerprint]), service)
            await policy.check(peer(billing), "127.0.0.1:1")
            record = await store.lookup(billing.fingerprint)
            assert record is not None
            self.assertEqual(record.state, KeyState.approved)
            decision = policy.decisions.verify(record)
            assert decision is not None
            self.assertEqual(decision.signer, service.fingerprint)
            with self.assertRaises(Refusal):
                await policy.check(peer(payroll), "127.0.0.1:1")
            self.assertIsNone(await store.lookup(payroll.fingerprint))
        finally:
            await store.close()

    def test_signedAndStored(self) -> None:
        """
        Behind an L{ApprovalPolicy}, the allow list's approval is signed with
        the service's own key and stored, as any approver's; a key not
        listed, with no approver after the list, is refused and nothing is
        stored.
        """
        return Deferred.fromCoroutine(self._policy())  # type: ignore[return-value]


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def connect(identity: Path, address: str) -> tuple[int, bytes, str]:
    done = run_cli("connect", "--identity", str(identity), address, input=HELLO)
    return done.returncode, done.stdout, done.stderr.decode(errors="replace")


def test_allowListedKey(tmp_path: Path, echo: EchoServer) -> None:
    """
    C{--allow} with a public-key file approves that key (the decision is
    stored, and C{dwtrust peers} shows it decided by C{allow}),
    and not another key, which goes on to the next approver (here C{deny}).
    After the list file gains the other key's fingerprint, C{SIGHUP} lets
    it in.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    alice = tmp_path / "alice"
    make_identity(alice, "acme", "alice")
    billing = make_identity(tmp_path / "billing", "acme", "billing")
    payroll = make_identity(tmp_path / "payroll", "acme", "payroll")
    listing = tmp_path / "allowed"
    listing.write_text(f"# keys let in\n{billing.publicKey.openssh()}\n")
    control = f"unix:{tmp_path / 'ledger' / 'control.sock'}"
    with ledger_daemon(
        tmp_path,
        echo.forward,
        "--owner",
        public_key(alice),
        "--allow",
        str(listing),
        "--approver",
        "deny",
    ) as daemon:
        status, output, error = connect(tmp_path / "billing", daemon.address)
        assert (status, output) == (0, HELLO), error
        status, output, error = connect(tmp_path / "payroll", daemon.address)
        assert status == 3 and output == b"", error
        assert "denied" in error, error
        peers = run_cli(
            "peers", "--json", "--control", control, "--identity", str(alice)
        )
        assert peers.returncode == 0, describe(peers)
        listed = {
            e["peer"]["fingerprint"]: e for e in json.loads(peers.stdout)["peers"]
        }
        assert set(listed) == {billing.fingerprint}, listed
        assert listed[billing.fingerprint]["state"] == "approved"
        assert listed[billing.fingerprint]["decidedBy"] == "allow"

        with listing.open("a") as f:
            f.write(f"{payroll.fingerprint}  # payroll, since today\n")
        os.kill(int(daemon.pidfile.read_text()), signal.SIGHUP)
        daemon.wait_for_log(r"2 key\(s\) on the allow list \(1 added, 0 removed\)")
        status, output, error = connect(tmp_path / "payroll", daemon.address)
        assert (status, output) == (0, HELLO), error


def test_badAllowEntry(tmp_path: Path) -> None:
    """
    A bad line in an C{--allow} file stops the daemon before it starts,
    with a message naming the file and the line, and no traceback.
    """
    listing = tmp_path / "allowed"
    listing.write_text("# nothing yet\nSHA256:short\n")
    done = run_twistd(
        "-n",
        "--pidfile",
        str(tmp_path / "d.pid"),
        "dwtrust",
        "--identity",
        str(tmp_path / "ledger"),
        "--allow",
        str(listing),
        cwd=tmp_path,
    )
    assert done.returncode != 0, describe(done)
    everything = done.stdout + done.stderr
    assert f"--allow {listing}, line 2: ".encode() in everything, describe(done)
    assert b"Traceback" not in everything, describe(done)
    assert not (tmp_path / "ledger").exists()
