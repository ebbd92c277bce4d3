"""
Tests for L{dwtrust.cli}: C{keygen} and C{show} in-process, through
L{main}; C{forget}, which runs a reactor, as a child process.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from io import StringIO

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import Identity
from dwtrust.cli import FAILED, OK, USAGE, main
from dwtrust.store._sqlite import migrateFile

FACTS = ["organization", "service", "algorithm", "fingerprint", "public_key"]
NAME_RULE = "use lower-case letters, digits, '.', '_' and '-'"
DWTRUST = os.path.join(os.path.dirname(sys.executable), "dwtrust")


def temporaryDirectory(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new, empty directory, removed when C{case} ends.
    """
    path = tempfile.mkdtemp(prefix="dwtrust-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return FilePath(path)


def run(*argv: str) -> tuple[int, str, str]:
    """
    Run L{main} with C{argv}; return its status, output and errors.
    """
    out, err = StringIO(), StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def snapshot(directory: FilePath[str]) -> dict[str, tuple[bytes, int]]:
    """
    Every file in C{directory}: its content and mode.
    """
    return {
        child.basename(): (
            child.getContent(),
            stat.S_IMODE(os.stat(child.path).st_mode),
        )
        for child in directory.children()
    }


def parseFacts(text: str) -> dict[str, str]:
    """
    The C{key: value} lines that C{keygen} and C{show} print, with keys as in
    the JSON (C{public key} becomes C{public_key}).
    """
    facts = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            facts[key.strip().replace(" ", "_")] = value.strip()
    return facts


class KeygenTests(SynchronousTestCase):
    """
    C{dwtrust keygen}.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self).child("identity")

    def keygen(self, *extra: str) -> tuple[int, str, str]:
        return run("keygen", "--identity", self.directory.path, *extra)

    def test_createsIdentity(self) -> None:
        """
        C{keygen} writes the identity: the private key with mode 0600 in a
        directory only its owner can enter, and the public key and
        description beside it; and the identity loads back.
        """
        status, out, err = self.keygen("--org", "acme", "--service", "billing")
        self.assertEqual((status, err), (OK, ""))
        self.assertIn("acme/billing", out)
        self.assertEqual(
            sorted(self.directory.listdir()),
            ["id_dwtrust", "id_dwtrust.pub", "identity.json"],
        )
        key = self.directory.child("id_dwtrust")
        self.assertEqual(stat.S_IMODE(os.stat(key.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory.path).st_mode), 0o700)
        identity = Identity.load(self.directory)
        self.assertEqual((identity.org, identity.service), ("acme", "billing"))
        self.assertEqual(identity.algorithm.name, "ssh-ed25519")

    def test_printsFacts(self) -> None:
        """
        C{keygen} prints the organization, service, algorithm, fingerprint and
        OpenSSH public key of what it made, and never the private key.
        """
        status, out, err = self.keygen("--org", "acme", "--service", "billing")
        self.assertEqual(status, OK)
        identity = Identity.load(self.directory)
        self.assertEqual(
            parseFacts(out),
            {
                "organization": "acme",
                "service": "billing",
                "algorithm": "ssh-ed25519",
                "fingerprint": identity.fingerprint,
                "public_key": identity.publicKey.openssh("acme/billing"),
            },
        )
        self.assertTrue(identity.fingerprint.startswith("SHA256:"))
        private = self.directory.child("id_dwtrust").getContent().decode("ascii")
        self.assertIn("PRIVATE KEY", private)
        self.assertNotIn("PRIVATE KEY", out + err)
        for line in private.splitlines()[1:-1]:
            self.assertNotIn(line, out + err)

    def test_algorithm(self) -> None:
        """
        C{--algorithm} chooses the key type.
        """
        status, out, err = self.keygen(
            "--org", "acme", "--service", "billing", "--algorithm", "ecdsa-p256"
        )
        self.assertEqual((status, err), (OK, ""))
        self.assertEqual(parseFacts(out)["algorithm"], "ecdsa-sha2-nistp256")
        self.assertEqual(
            Identity.load(self.directory).algorithm.name, "ecdsa-sha2-nistp256"
        )

    def test_existingIdentity(self) -> None:
        """
        C{keygen} into a directory that holds an identity fails with status 1
        and says so, and leaves every file as it was.
        """
        self.assertEqual(self.keygen("--org", "acme", "--service", "billing")[0], OK)
        before = snapshot(self.directory)
        status, out, err = self.keygen("--org", "acme", "--service", "other")
        self.assertEqual((status, out), (FAILED, ""))
        self.assertIn("already holds an identity", err)
        self.assertIn(self.directory.path, err)
        self.assertEqual(snapshot(self.directory), before)

    def test_missingOrg(self) -> None:
        """
        C{keygen} without C{--org} is a usage error (status 2) that names it,
        and creates nothing.
        """
        status, out, err = self.keygen("--service", "billing")
        self.assertEqual((status, out), (USAGE, ""))
        self.assertIn("--org is required", err)
        self.assertFalse(self.directory.exists())

    def test_missingService(self) -> None:
        """
        C{keygen} without C{--service} is a usage error (status 2).
        """
        status, out, err = self.keygen("--org", "acme")
        self.assertEqual((status, out), (USAGE, ""))
        self.assertIn("--service is required", err)
        self.assertFalse(self.directory.exists())

    def test_unknownAlgorithm(self) -> None:
        """
        An unknown algorithm fails with a message that lists the ones there
        are, and creates nothing.
        """
        status, out, err = self.keygen(
            "--org", "acme", "--service", "billing", "--algorithm", "dsa"
        )
        self.assertIn(status, (FAILED, USAGE))
        self.assertEqual(out, "")
        self.assertIn("unknown algorithm 'dsa'", err)
        self.assertIn("ecdsa-p256, ecdsa-p384, ed25519, rsa-3072, rsa-4096", err)
        self.assertFalse(self.directory.exists())

    def assertBadName(self, org: str, service: str, expected: str) -> None:
        """
        C{keygen} with these names fails with status 1 and C{expected} in its
        message, and creates nothing.
        """
        status, out, err = self.keygen("--org", org, "--service", service)
        self.assertEqual((status, out), (FAILED, ""))
        self.assertIn(expected, err)
        self.assertFalse(self.directory.exists())

    def test_upperCaseOrg(self) -> None:
        """
        Upper-case letters are not allowed in names.
        """
        self.assertBadName("Acme", "billing", "organization name 'Acme'")
        self.assertBadName("Acme", "billing", NAME_RULE)

    def test_upperCaseService(self) -> None:
        self.assertBadName("acme", "Billing", "service name 'Billing'")
        self.assertBadName("acme", "Billing", NAME_RULE)

    def test_blankName(self) -> None:
        """
        A name of spaces is refused with the name rule.
        """
        self.assertBadName("   ", "billing", NAME_RULE)

    def test_emptyName(self) -> None:
        """
        An empty name is refused, and nothing is created.  (C{main} treats
        C{--org ""} as a missing option: a usage error.)
        """
        status, out, err = self.keygen("--org", "", "--service", "billing")
        self.assertEqual((status, out), (USAGE, ""))
        self.assertIn("--org is required", err)
        self.assertFalse(self.directory.exists())

    def test_nameTooLong(self) -> None:
        """
        Names of more than 63 characters are refused, saying how long they may
        be.
        """
        self.assertBadName("acme", "a" * 64, "at most 63 are allowed")
        self.assertEqual(self.keygen("--org", "acme", "--service", "a" * 63)[0], OK)

    def test_nameEdges(self) -> None:
        """
        A name must start and end with a letter or digit.
        """
        self.assertBadName("acme-", "billing", NAME_RULE)
        self.assertBadName("acme", "_billing", NAME_RULE)


class ShowTests(SynchronousTestCase):
    """
    C{dwtrust show}.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self).child("identity")

    def test_showsSameFacts(self) -> None:
        """
        C{show} prints what C{keygen} printed.
        """
        _, made, _ = run(
            "keygen",
            "--identity",
            self.directory.path,
            "--org",
            "acme",
            "--service",
            "billing",
        )
        status, out, err = run("show", "--identity", self.directory.path)
        self.assertEqual((status, err), (OK, ""))
        self.assertEqual(parseFacts(out), parseFacts(made))
        self.assertEqual(sorted(parseFacts(out)), sorted(FACTS))

    def test_json(self) -> None:
        """
        C{show --json} prints one JSON object with the identity's facts.
        """
        identity = Identity.generate("acme", "ledger", "ecdsa-p384")
        identity.save(self.directory)
        status, out, err = run("show", "--identity", self.directory.path, "--json")
        self.assertEqual((status, err), (OK, ""))
        self.assertEqual(
            json.loads(out),
            {
                "organization": "acme",
                "service": "ledger",
                "algorithm": "ecdsa-sha2-nistp384",
                "fingerprint": identity.fingerprint,
                "publicKey": identity.publicKey.openssh("acme/ledger"),
            },
        )

    def test_noIdentity(self) -> None:
        """
        C{show} where there is no identity fails with status 1, and says how
        to make one.
        """
        self.directory.makedirs()
        status, out, err = run("show", "--identity", self.directory.path)
        self.assertEqual((status, out), (FAILED, ""))
        self.assertIn("no identity in", err)
        self.assertIn("dwtrust keygen", err)

    def test_unsafeKeyMode(self) -> None:
        """
        C{show} refuses a private key that others can read, saying to
        C{chmod 600} it.
        """
        Identity.generate("acme", "billing").save(self.directory)
        self.directory.child("id_dwtrust").chmod(0o644)
        status, out, err = run("show", "--identity", self.directory.path)
        self.assertEqual((status, out), (FAILED, ""))
        self.assertIn("chmod 600", err)


class UsageTests(SynchronousTestCase):
    """
    The command line as a whole.
    """

    def test_noCommand(self) -> None:
        """
        No command is a usage error, status 2, with the usage text.
        """
        status, out, err = run()
        self.assertEqual((status, out), (USAGE, ""))
        self.assertIn("give a command", err)
        self.assertIn("keygen", err)

    def test_unknownCommand(self) -> None:
        """
        An unknown command is a usage error, status 2.
        """
        status, out, err = run("frobnicate")
        self.assertEqual((status, out), (USAGE, ""))
        self.assertIn("frobnicate", err)


class ForgetTests(SynchronousTestCase):
    """
    C{dwtrust forget}, run as the installed command since it runs a reactor.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self)

    def forget(self, address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DWTRUST, "forget", "--identity", self.directory.path, address],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_nothingPinned(self) -> None:
        """
        C{forget} of an address with no pin fails with status 1 and says so.
        """
        child = self.forget("ledger.example:8443")
        self.assertEqual(child.returncode, FAILED, child.stderr)
        self.assertIn("no key is pinned for ledger.example:8443", child.stderr)
        self.assertEqual(child.stdout, "")

    def test_forgetsPin(self) -> None:
        """
        C{forget} removes the pin for that address and no other, says so, and
        exits 0; a second C{forget} finds nothing.
        """
        store = self.directory.child("trust.sqlite3").path
        migrateFile(store)
        connection = sqlite3.connect(store)
        for address in ["ledger.example:8443", "other.example:8443"]:
            connection.execute(
                "INSERT INTO known_services VALUES (?, 'acme', 'ledger',"
                " 'ssh-ed25519', x'00', 'SHA256:x', 1.0)",
                (address,),
            )
        connection.commit()
        connection.close()

        child = self.forget("ledger.example:8443")
        self.assertEqual(child.returncode, OK, child.stderr)
        self.assertIn("forgot the key pinned for ledger.example:8443", child.stdout)

        connection = sqlite3.connect(store)
        left = connection.execute("SELECT address FROM known_services").fetchall()
        connection.close()
        self.assertEqual(left, [("other.example:8443",)])

        again = self.forget("ledger.example:8443")
        self.assertEqual(again.returncode, FAILED)
        self.assertIn("no key is pinned", again.stderr)
