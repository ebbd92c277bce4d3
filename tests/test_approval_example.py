"""
Tests for C{docs/examples/acme_approval.py}, the approval policy that
C{docs/approval.rst} includes: it decides on keys, never on names alone.

The example is imported from its file, as the docs show it, with real keys.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import Identity, PeerIdentity, PublicKey
from dwtrust.approval import (
    ApprovalRequest,
    CallableApprover,
    ChainApprover,
    Decision,
    approverFromSpecs,
    checkApproverSpecs,
)
from dwtrust.store import KeyState
from dwtrust.testing import (
    FakeApprover,
    MemoryTrustStore,
    approvalRequest,
    connectInMemory,
    decide,
    memoryAuthenticator,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = DOCS / "examples"
SAMPLE = EXAMPLES / "allowed_keys"


@contextmanager
def allowedKeys(path: str) -> Iterator[None]:
    """
    Set C{$ACME_ALLOWED_KEYS} while the block runs.
    """
    old = os.environ.get("ACME_ALLOWED_KEYS")
    os.environ["ACME_ALLOWED_KEYS"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["ACME_ALLOWED_KEYS"]
        else:
            os.environ["ACME_ALLOWED_KEYS"] = old


def loadExample() -> ModuleType:
    """
    Import C{docs/examples/acme_approval.py} from its file, with the sample
    allow-list that sits beside it.
    """
    spec = importlib.util.spec_from_file_location(
        "_acme_approval_example", EXAMPLES / "acme_approval.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with allowedKeys(str(SAMPLE)):
        spec.loader.exec_module(module)
    return module


example = loadExample()


def temporary(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new directory, removed when C{case} ends (outside the working tree).
    """
    directory = tempfile.mkdtemp(prefix="dwtrust-example-")
    case.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    return FilePath(directory)


def observe(case: SynchronousTestCase) -> EventLoggingObserver:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


def writeAtomically(path: FilePath[str], text: str, when: int) -> None:
    """
    Replace C{path}'s content as a deployment system would (a new file renamed
    over the old one), with the modification time C{when}.
    """
    temporary = path.siblingExtension(".new")
    temporary.setContent(text.encode("utf-8"))
    os.utime(temporary.path, ns=(when, when))
    os.replace(temporary.path, path.path)


def claiming(
    key: PublicKey, name: str, service: str = "acme/ledger"
) -> ApprovalRequest:
    """
    A request from a peer that proved it holds C{key} and claims to be
    C{name} (C{org/service}).
    """
    org, _, peerService = name.partition("/")
    return ApprovalRequest(
        PeerIdentity(org, peerService, key), "10.1.2.3:40000", service
    )


class AllowListTests(SynchronousTestCase):
    """
    L{example.AllowListPolicy}: approves a key the allow-list names, under the
    org/service listed with it, and nothing else.
    """

    def setUp(self) -> None:
        self.directory = temporary(self)
        # acme's deployment system makes billing's identity (as `dwtrust
        # keygen` does) and lists billing's id_dwtrust.pub; payroll is
        # listed by fingerprint.
        self.billing = Identity.generate("acme", "billing")
        self.billing.save(self.directory.child("billing"))
        self.payroll = Identity.generate("acme", "payroll", "ecdsa-p256")
        publicLine = self.directory.child("billing").child("id_dwtrust.pub")
        self.list = self.directory.child("allowed_keys")
        self.list.setContent(
            b"# acme's deployment system writes this file\n\n"
            + publicLine.getContent()
            + f"{self.payroll.fingerprint} acme/payroll\n".encode()
        )
        self.policy = example.AllowListPolicy(self.list)

    def test_listedKeyApproved(self) -> None:
        """
        A listed key that claims the org/service listed with it is approved,
        and the approval is remembered.
        """
        decision = decide(self.policy, claiming(self.billing.publicKey, "acme/billing"))
        self.assertEqual(
            decision,
            Decision(
                True,
                "the deployment handed this key out as acme/billing",
                "acme-allow-list",
            ),
        )
        assert decision is not None
        self.assertTrue(decision.remember)
        byFingerprint = decide(
            self.policy, claiming(self.payroll.publicKey, "acme/payroll")
        )
        assert byFingerprint is not None
        self.assertTrue(byFingerprint.approved)

    def test_listedKeyClaimingAnotherName(self) -> None:
        """
        A listed key that claims any other org/service, even one the list
        names (with another key), is refused, nothing is stored, and a warning
        names both identities.
        """
        observer = observe(self)
        for name in ["acme/payroll", "acme/admin", "evil/billing"]:
            decision = decide(self.policy, claiming(self.billing.publicKey, name))
            self.assertEqual(
                decision,
                Decision(
                    False,
                    f"this key was not handed out as {name}",
                    "acme-allow-list",
                    remember=False,
                ),
            )
        warnings = [e for e in observer if e["log_level"] is LogLevel.warn]
        self.assertEqual(
            [(e["listed"], e["claimed"]) for e in warnings],
            [
                ("acme/billing", n)
                for n in ["acme/payroll", "acme/admin", "evil/billing"]
            ],
        )

    def test_unlistedKeyClaimingListedName(self) -> None:
        """
        A key the list does not name has no opinion from the policy, whatever
        names it claims: the next approver decides.
        """
        for name in ["acme/billing", "acme/payroll", "evil/mallory"]:
            org, _, service = name.partition("/")
            self.assertIsNone(decide(self.policy, approvalRequest(org, service)))

    def test_keysNotNames(self) -> None:
        """
        The key decides: another key, of another algorithm, claiming a listed
        key's names gets no opinion.
        """
        impostor = Identity.generate("acme", "billing", "ecdsa-p256").publicKey
        self.assertIsNone(decide(self.policy, claiming(impostor, "acme/billing")))

    def test_changes(self) -> None:
        """
        The list is read again when it changes: a key added is approved, a key
        removed is no longer approved.
        """
        billingLine = self.billing.publicKey.openssh("acme/billing")
        newcomer = Identity.generate("acme", "reports")
        writeAtomically(
            self.list,
            f"{billingLine}\n{newcomer.publicKey.openssh(newcomer.name)}\n",
            1_000_000_000,
        )
        decision = decide(self.policy, claiming(newcomer.publicKey, "acme/reports"))
        assert decision is not None
        self.assertTrue(decision.approved)
        self.assertIsNone(
            decide(self.policy, claiming(self.payroll.publicKey, "acme/payroll"))
        )
        writeAtomically(self.list, f"{billingLine}\n", 2_000_000_000)
        self.assertIsNone(
            decide(self.policy, claiming(newcomer.publicKey, "acme/reports"))
        )

    def test_brokenLater(self) -> None:
        """
        A list that becomes malformed or goes away refuses every key, with
        nothing stored, and logs why, naming the file and line.
        """
        observer = observe(self)
        writeAtomically(self.list, "ssh-ed25519 AAAA acme/billing\n", 1_000_000_000)
        request = claiming(self.billing.publicKey, "acme/billing")
        refused = Decision(False, "the approval callback failed", "test", False)
        self.assertEqual(decide(self.policy, request), refused)
        self.list.remove()
        self.assertEqual(decide(self.policy, request), refused)
        self.assertEqual(len(self.flushLoggedErrors(example.AllowListError)), 2)
        [malformed, missing] = [
            e["log_failure"].value
            for e in observer
            if e.get("event") == "dwtrust.approver.python.failed"
        ]
        self.assertIsInstance(malformed, example.AllowListError)
        self.assertIn(f"{self.list.path}, line 1: not a public key", str(malformed))
        self.assertIsInstance(missing, example.AllowListError)
        self.assertIn(f"cannot read {self.list.path}", str(missing))


class MalformedAllowListTests(SynchronousTestCase):
    """
    A malformed allow-list is refused as a whole, and the message names the
    file, the line and what is wrong with it.
    """

    def setUp(self) -> None:
        self.key = Identity.generate("acme", "billing").publicKey
        self.line = self.key.openssh()

    def assertMalformed(self, line: str, message: str) -> None:
        path = temporary(self).child("allowed_keys")
        path.setContent(f"# a comment\n{line}\n".encode())
        with self.assertRaises(example.AllowListError) as raised:
            example.AllowListPolicy(path)
        self.assertEqual(str(raised.exception), f"{path.path}, line 2: {message}")

    def test_noName(self) -> None:
        """
        A key listed without a name is an error, not a key for any name.
        """
        expected = (
            "the key must be followed by the one org/service it was handed out"
            " as, not 'nothing'"
        )
        self.assertMalformed(self.line, expected)
        self.assertMalformed(self.key.fingerprint, expected)

    def test_badName(self) -> None:
        for names in ["billing", "acme/billing extra", "Acme/Billing", "a/b/c"]:
            self.assertMalformed(
                f"{self.line} {names}",
                "the key must be followed by the one org/service it was handed"
                f" out as, not {names!r}",
            )

    def test_badKey(self) -> None:
        self.assertMalformed(
            "ssh-ed25519 AAAA! acme/billing",
            "not a public key: the public key is not valid base64",
        )
        self.assertMalformed(
            "ssh-dss AAAAB3NzaC1kc3M= acme/billing",
            "not a public key: unsupported key type 'ssh-dss'",
        )

    def test_badFingerprint(self) -> None:
        self.assertMalformed(
            "SHA256:q6g1Ayupm5MAXlsG8HBrJYB7 acme/billing",
            "'SHA256:q6g1Ayupm5MAXlsG8HBrJYB7' is not a SHA256: fingerprint",
        )

    def test_twoNames(self) -> None:
        """
        One key listed under two names is an error.
        """
        path = temporary(self).child("allowed_keys")
        path.setContent(
            f"{self.line} acme/billing\n{self.key.fingerprint} acme/admin\n".encode()
        )
        with self.assertRaises(example.AllowListError) as raised:
            example.AllowListPolicy(path)
        self.assertEqual(
            str(raised.exception),
            f"{path.path}, line 2: {self.key.fingerprint} is listed as both"
            " acme/billing and acme/admin",
        )


class Connected(Protocol):
    connected = False

    def connectionMade(self) -> None:
        self.connected = True


class InTheDaemonTests(SynchronousTestCase):
    """
    The policy in front of the owners, as C{--approver
    python:acme_approval.policy --approver owners} chains them, over a whole
    in-memory handshake.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.billing = Identity.generate("acme", "billing")
        path = temporary(self).child("allowed_keys")
        path.setContent(f"{self.billing.publicKey.openssh('acme/billing')}\n".encode())
        self.owners = FakeApprover()
        self.store = MemoryTrustStore()
        policy = CallableApprover(example.AllowListPolicy(path), "acme-allow-list")
        self.server = memoryAuthenticator(
            Identity.generate("acme", "ledger"),
            self.store,
            ChainApprover([policy, self.owners]),
            self.clock,
        )

    def connect(self, client: Identity) -> tuple[Connected, Any]:
        app = Connected()
        _, _, pump = connectInMemory(
            self.server,
            Factory.forProtocol(lambda: app),
            memoryAuthenticator(client, MemoryTrustStore(), FakeApprover(), self.clock),
            Factory.forProtocol(Connected),
            self.clock,
        )
        return app, pump

    def test_listedKeyConnects(self) -> None:
        """
        A listed key under its own names connects at once, without the owners
        being asked, and the approval is stored.
        """
        app, _ = self.connect(self.billing)
        self.assertTrue(app.connected)
        self.assertEqual(self.owners.requests, [])
        record = self.store.peers[self.billing.fingerprint]
        self.assertIs(record.state, KeyState.approved)
        self.assertEqual((record.org, record.service), ("acme", "billing"))

    def test_listedKeyClaimingAnotherName(self) -> None:
        """
        A listed key claiming another name is refused: the application is not
        connected, the owners are not asked, and nothing is stored.
        """
        admin = Identity.fromPrivateKey("acme", "admin", self.billing.privateKey)
        app, _ = self.connect(admin)
        self.assertFalse(app.connected)
        self.assertEqual(self.owners.requests, [])
        self.assertEqual(self.store.peers, {})

    def test_unlistedKeyGoesToTheOwners(self) -> None:
        """
        An unlisted key claiming a listed name waits for the owners.
        """
        impostor = Identity.generate("acme", "billing")
        app, pump = self.connect(impostor)
        self.assertFalse(app.connected)
        [asked] = self.owners.requests
        self.assertEqual(asked.request.peer.fingerprint, impostor.fingerprint)
        asked.deny()
        pump.flush()
        self.assertFalse(app.connected)


class PythonSpecTests(SynchronousTestCase):
    """
    The example as the docs tell the daemon to load it: C{--approver
    python:acme_approval.policy}, with C{docs/examples} on C{PYTHONPATH} and
    C{$ACME_ALLOWED_KEYS} naming the allow-list.
    """

    def setUp(self) -> None:
        sys.path.insert(0, str(EXAMPLES))
        self.addCleanup(sys.path.remove, str(EXAMPLES))
        self.addCleanup(sys.modules.pop, "acme_approval", None)

    def load(self, path: str, owners: FakeApprover) -> ChainApprover:
        """
        Check and make the approvers as C{twistd dwtrust} does, from a fresh
        import of C{acme_approval} with C{$ACME_ALLOWED_KEYS} set to C{path}.
        """
        specs = ["python:acme_approval.policy", "owners"]
        sys.modules.pop("acme_approval", None)
        with allowedKeys(path):
            checkApproverSpecs(specs)
            approver = approverFromSpecs(specs, owners)
        assert isinstance(approver, ChainApprover)
        return approver

    def test_sample(self) -> None:
        """
        With the sample allow-list, the key it lists for acme/billing is
        approved, and another key claiming acme/billing goes to the owners.
        """
        owners = FakeApprover()
        approver = self.load(str(SAMPLE), owners)
        [line] = [x for x in SAMPLE.read_text().splitlines() if x.startswith("ssh-")]
        listed = PublicKey.fromOpenSSH(line)
        decision = decide(approver, claiming(listed, "acme/billing"))
        assert decision is not None
        self.assertTrue(decision.approved)
        self.assertEqual(owners.requests, [])
        approver.requestApproval(approvalRequest("acme", "billing"))
        [asked] = owners.requests
        self.assertEqual(asked.request.peer.name, "acme/billing")

    def test_startUp(self) -> None:
        """
        A missing or malformed allow-list stops the daemon at start-up,
        saying which file and line.
        """
        bad = temporary(self).child("allowed_keys")
        bad.setContent(b"SHA256:nope acme/billing\n")
        error = self.assertRaises(ValueError, self.load, bad.path, FakeApprover())
        self.assertIn(
            f"AllowListError: {bad.path}, line 1: 'SHA256:nope' is not a SHA256:"
            " fingerprint",
            str(error),
        )
        missing = temporary(self).child("missing").path
        error = self.assertRaises(ValueError, self.load, missing, FakeApprover())
        self.assertIn(f"AllowListError: cannot read {missing}", str(error))


class DocsTests(SynchronousTestCase):
    """
    C{docs/approval.rst} shows the example's own files, and says how to run it.
    """

    def test_included(self) -> None:
        """
        The page includes the example's files, rather than a copy that could
        drift, and gives the command line the tests above load it with.
        """
        text = (DOCS / "approval.rst").read_text(encoding="utf-8")
        for shown in [
            ".. literalinclude:: examples/acme_approval.py",
            ".. literalinclude:: examples/allowed_keys",
            "--approver python:acme_approval.policy --approver owners",
            "PYTHONPATH=docs/examples",
            "ACME_ALLOWED_KEYS=",
        ]:
            self.assertTrue(shown in text, f"{shown!r} is not in approval.rst")

    def test_sample(self) -> None:
        """
        The sample allow-list parses, to the keys it shows.
        """
        allowed = example.parseAllowList(SAMPLE.read_text(), str(SAMPLE))
        self.assertEqual(
            allowed,
            {
                "SHA256:q6g1Ayupm5MAXlsG8HBrJYB7usLiZWszpliuBs+iRa4": "acme/billing",
                "SHA256:qbaT9xVEYwqyYBHq6nuP0X1ABMgQhzTkaIb6XcKUfes": "acme/payroll",
            },
        )
