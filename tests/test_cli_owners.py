"""
Tests for the owners' commands of L{dwtrust.cli}: C{pending}, C{approve},
C{deny}, C{block}, C{revoke}, C{peers} and C{watch}.

Prefix resolution and output formatting are pure functions, tested here
directly; then the real command, as a child process, against a real control
endpoint (a UNIX socket) served by this process's reactor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from io import StringIO
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import Authenticator, PeerIdentity
from dwtrust._decision import SignedDecision, Signers
from dwtrust.cli import (
    FAILED,
    OK,
    REFUSED,
    USAGE,
    CommandError,
    NoMatch,
    Options,
    _decideCommand,
    _DecideOptions,
    controlAddress,
    decisionJSON,
    describeDecision,
    formatMessage,
    formatPeers,
    formatPending,
    formatTable,
    isoTime,
    listingJSON,
    main,
    resolve,
)
from dwtrust.cli._owners import messageJSON
from dwtrust.control import (
    ControlBus,
    ControlMessage,
    Listing,
    OwnersOnlyPolicy,
    controlFactory,
)
from dwtrust.store import KeyState
from dwtrust.testing import MemoryTrustStore, recordDecision

from .deciding import decisionsFor
from .helpers import makeIdentity, temporaryDirectory
from .test_control import ControlTestCase, peerOf

reactor: Any = _reactor
DWTRUST = os.path.join(os.path.dirname(sys.executable), "dwtrust")
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
FP_A = "SHA256:AAAAbbbbCCCCddddEEEEffffGGGGhhhhIIIIjjjjKKK"
FP_B = "SHA256:AAAAzzzzCCCCddddEEEEffffGGGGhhhhIIIIjjjjKKK"
FP_OLD = "SHA256:oldkeyoldkeyoldkeyoldkeyoldkeyoldkeyoldkey"


def pendingEntry(
    requestId: str,
    fingerprint: str,
    service: str = "billing",
    known: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "id": requestId,
        "fingerprint": fingerprint,
        "org": "acme",
        "service": service,
        "algorithm": "ssh-ed25519",
        "publicKey": "ssh-ed25519 AAAA acme/" + service,
        "source": "10.1.2.3:40000",
        "firstSeen": T0,
        "lastSeen": T0 + 60,
        "attempts": 3,
        "expires": T0 + 86400,
        "knownKeys": known or [],
        "knownKeysOmitted": 0,
    }


class ControlAddressTests(SynchronousTestCase):
    """
    L{controlAddress}: what C{--control} accepts.
    """

    def test_unix(self) -> None:
        home = os.path.expanduser("~")
        self.assertEqual(
            controlAddress("unix:~/.dwtrust/control.sock"),
            (f"unix:{home}/.dwtrust/control.sock",) * 2,
        )
        self.assertEqual(
            controlAddress("unix:path=~/c.sock:timeout=3"),
            (f"unix:path={home}/c.sock:timeout=3",) * 2,
        )

    def test_path(self) -> None:
        self.assertEqual(controlAddress("/run/x.sock"), ("unix:/run/x.sock",) * 2)

    def test_hostPort(self) -> None:
        self.assertEqual(
            controlAddress("ledger.example:8444"),
            ("tcp:host=ledger.example:port=8444", "ledger.example:8444"),
        )

    def test_description(self) -> None:
        self.assertEqual(
            controlAddress("tcp:host=::1:port=9"), ("tcp:host=::1:port=9",) * 2
        )


class ResolveTests(SynchronousTestCase):
    """
    L{resolve}: an ID or fingerprint, given by a unique prefix.
    """

    entries = [
        pendingEntry("3f2a9c01de", FP_A),
        pendingEntry("3f77000000", FP_B),
        pendingEntry("aaaa000000", "SHA256:Xyz"),
    ]

    def test_byId(self) -> None:
        self.assertIs(resolve("3f2", self.entries, "request"), self.entries[0])
        self.assertIs(resolve("3F7", self.entries, "request"), self.entries[1])

    def test_byFingerprint(self) -> None:
        """
        A fingerprint's prefix may be given with or without C{SHA256:}, in
        either case.
        """
        for prefix, index in [("AAAAb", 0), ("SHA256:AAAAz", 1), ("sha256:Xy", 2)]:
            self.assertIs(resolve(prefix, self.entries, "request"), self.entries[index])

    def test_exactWins(self) -> None:
        """
        A whole ID wins over a fingerprint it merely begins.
        """
        self.assertIs(resolve("aaaa000000", self.entries, "request"), self.entries[2])
        self.assertIs(resolve(FP_A, self.entries, "request"), self.entries[0])

    def test_ambiguous(self) -> None:
        """
        A prefix that several entries share is an error that lists them.
        """
        error = self.assertRaises(CommandError, resolve, "3f", self.entries, "request")
        self.assertNotIsInstance(error, NoMatch)
        text = str(error)
        self.assertIn("'3f' matches 2 requests", text)
        self.assertIn("3f2a9c01de  " + FP_A + "  acme/billing", text)
        self.assertIn("3f77000000  " + FP_B, text)
        error = self.assertRaises(CommandError, resolve, "AAAA", self.entries, "key")
        self.assertIn("matches 3 keys", str(error))

    def test_unknown(self) -> None:
        error = self.assertRaises(NoMatch, resolve, "zz", self.entries, "request")
        self.assertEqual(str(error), "no request matches 'zz'")
        self.assertRaises(NoMatch, resolve, "3f", [], "request")


class FormatTests(SynchronousTestCase):
    """
    The plain-text output: aligned columns, ISO times, and what an owner
    must notice.
    """

    def test_isoTime(self) -> None:
        self.assertEqual(isoTime(T0), "2023-11-14T22:13:20Z")
        self.assertEqual(isoTime(0), "-")

    def test_table(self) -> None:
        self.assertEqual(
            formatTable(["A", "LONG HEADER", "C"], [["xxxx", "y", ""], ["", "", "z"]]),
            ["A     LONG HEADER  C", "xxxx  y", "                   z"],
        )

    def test_pending(self) -> None:
        """
        Every request is a row under aligned headers, followed by a line for
        each other key known for its org/service.
        """
        listing = Listing(
            (
                pendingEntry("3f2a9c01de", FP_A),
                pendingEntry(
                    "77aa",
                    FP_B,
                    "ledger",
                    [{"fingerprint": FP_OLD, "state": "approved"}],
                ),
            ),
            2,
        )
        self.assertEqual(
            formatPending(listing, "acme/ledger").splitlines(),
            [
                "ID          FINGERPRINT                                         "
                "ORG/SERVICE   ALGORITHM    FROM            FIRST SEEN            "
                "ATTEMPTS",
                f"3f2a9c01de  {FP_A}  acme/billing  ssh-ed25519  10.1.2.3:40000"
                "  2023-11-14T22:13:20Z  3",
                f"77aa        {FP_B}  acme/ledger   ssh-ed25519  10.1.2.3:40000"
                "  2023-11-14T22:13:20Z  3",
                f"            acme/ledger already has approved key {FP_OLD}",
            ],
        )

    def test_pendingNone(self) -> None:
        self.assertEqual(
            formatPending(Listing((), 0), "acme/ledger"),
            "no pending requests for acme/ledger\n",
        )

    def test_pendingOmitted(self) -> None:
        listing = Listing((pendingEntry("3f2a9c01de", FP_A),), 12)
        self.assertEqual(
            formatPending(listing, "acme/ledger").splitlines()[-1],
            "... and 11 more not shown",
        )

    def test_peers(self) -> None:
        entry = {
            "fingerprint": FP_A,
            "org": "acme",
            "service": "billing",
            "algorithm": "ssh-ed25519",
            "state": "revoked",
            "decidedBy": FP_OLD,
            "firstSeen": T0,
            "lastSeen": T0,
            "attempts": 12,
            "source": "",
        }
        self.assertEqual(
            formatPeers(Listing((entry,), 1), "acme/ledger").splitlines(),
            [
                "FINGERPRINT".ljust(len(FP_A))
                + "  ORG/SERVICE   ALGORITHM    STATE    "
                + "DECIDED BY".ljust(len(FP_OLD))
                + "  LAST SEEN             ATTEMPTS  FROM",
                f"{FP_A}  acme/billing  ssh-ed25519  revoked  {FP_OLD}"
                "  2023-11-14T22:13:20Z  12        -",
            ],
        )
        self.assertEqual(
            formatPeers(Listing((), 0), "acme/ledger"),
            "no keys with a decision for acme/ledger\n",
        )

    def test_message(self) -> None:
        message = ControlMessage(
            "approval_requested",
            "acme/ledger",
            FP_A,
            org="acme",
            peerService="billing",
            source="10.1.2.3:40000",
            requestId="3f2a9c01de",
            knownKeys=(FP_OLD,),
            reason="acme/billing wants to connect to acme/ledger",
            time=T0,
        )
        self.assertEqual(
            formatMessage(message),
            f"2023-11-14T22:13:20Z  approval_requested  acme/billing  {FP_A}"
            "  10.1.2.3:40000  request 3f2a9c01de; known keys: "
            f"{FP_OLD}; acme/billing wants to connect to acme/ledger",
        )
        decided = ControlMessage(
            "decided",
            "acme/ledger",
            FP_A,
            org="acme",
            peerService="billing",
            state="approved",
            decidedBy=FP_OLD,
            time=T0,
        )
        self.assertEqual(
            formatMessage(decided),
            f"2023-11-14T22:13:20Z  decided             acme/billing  {FP_A}"
            f"  -  approved by {FP_OLD}",
        )

    def test_controlCharacters(self) -> None:
        """
        Nothing in the output can drive the terminal: control characters from
        a peer or another owner are escaped.
        """
        message = ControlMessage(
            "decided", "acme/ledger", FP_A, reason="ok\x1b[2K\rfake line\n", time=T0
        )
        line = formatMessage(message)
        self.assertNotIn("\x1b", line)
        self.assertNotIn("\n", line)
        self.assertIn("ok\\x1b[2K\\rfake line\\n", line)
        entry = pendingEntry("3f\x1b", FP_A)
        self.assertNotIn("\x1b", formatPending(Listing((entry,), 1), "acme/ledger"))


class JSONTests(SynchronousTestCase):
    """
    The shapes of C{--json} output.
    """

    def test_listing(self) -> None:
        entry = pendingEntry("3f2a9c01de", FP_A)
        self.assertEqual(
            listingJSON("pending", Listing((entry,), 3), "acme/ledger"),
            {
                "service": "acme/ledger",
                "total": 3,
                "omitted": 2,
                "pending": [
                    {
                        "requestId": "3f2a9c01de",
                        "peer": {
                            "organization": "acme",
                            "service": "billing",
                            "algorithm": "ssh-ed25519",
                            "fingerprint": FP_A,
                            "publicKey": "ssh-ed25519 AAAA acme/billing",
                        },
                        "source": "10.1.2.3:40000",
                        "firstSeen": T0,
                        "lastSeen": T0 + 60,
                        "attempts": 3,
                        "expires": T0 + 86400,
                        "knownKeys": [],
                        "knownKeysOmitted": 0,
                    }
                ],
            },
        )

    def test_decision(self) -> None:
        owner = makeIdentity("acme", "alice")
        subject = makeIdentity("acme", "billing")
        peer = PeerIdentity("acme", "billing", subject.publicKey)
        decision = SignedDecision.make(
            owner, "acme/ledger", peer, "denied", T0, "no", "SHA256:ledger", 3
        )
        facts = decisionJSON(decision)
        self.assertEqual(
            {k: v for k, v in facts.items() if k != "signature"},
            {
                "service": "acme/ledger",
                "state": "denied",
                "peer": {
                    "organization": "acme",
                    "service": "billing",
                    "algorithm": "ssh-ed25519",
                    "fingerprint": subject.fingerprint,
                },
                "requestId": None,
                "decidedAt": int(T0),
                "reason": "no",
                "decidedBy": owner.fingerprint,
                "serviceKey": "SHA256:ledger",
                "sequence": 3,
            },
        )
        self.assertIsInstance(facts["signature"], str)
        self.assertEqual(
            describeDecision(decision, {"id": "3f2a9c01de"}),
            f"denied acme/billing {subject.fingerprint} (request 3f2a9c01de) for"
            f" acme/ledger, signed by {owner.fingerprint}",
        )


class UsageTests(SynchronousTestCase):
    """
    The owners' commands' arguments.
    """

    def command(self, *argv: str) -> tuple[int, str]:
        out, err = StringIO(), StringIO()
        return main(list(argv), out, err), err.getvalue()

    def test_noTarget(self) -> None:
        for command in ["approve", "deny", "block", "revoke"]:
            status, _ = self.command(command, "--control", "/nonexistent")
            self.assertEqual(status, USAGE, command)

    def test_emptyTarget(self) -> None:
        status, err = self.command("approve", "SHA256:")
        self.assertEqual(status, USAGE)
        self.assertIn("give a request ID or a fingerprint", err)

    def test_longReason(self) -> None:
        status, err = self.command("deny", "--reason", "x" * 1001, "3f")
        self.assertEqual(status, USAGE)
        self.assertIn("--reason", err)


class DecideCommandTests(ControlTestCase):
    """
    C{approve}, C{deny}, C{block} and C{revoke} over an in-memory control
    connection: which key they pick, and what they send.
    """

    def setUp(self) -> None:
        super().setUp()
        self.addPending(self.billingNew, "3f2a9c01de")
        self.approve(self.billing)
        self.client = self.connectOwner()

    def decide(self, *argv: str) -> str:
        """
        Run a decision command; its output.
        """
        options = Options()
        options.parseOptions([*argv[:1], "--control", "/unused", *argv[1:]])
        command = options.subOptions
        assert isinstance(command, _DecideOptions)
        out = StringIO()
        running = Deferred.fromCoroutine(
            _decideCommand(self.client, self.owner, command, out)
        )
        self.assertEqual(self.result(running), OK)
        return out.getvalue()

    def test_approveByFingerprint(self) -> None:
        """
        A request can be given by its key's fingerprint; C{--json} prints the
        signed decision, the request it settled, and the key's new record.
        """
        prefix = self.billingNew.fingerprint[7:15]
        result = json.loads(self.decide("approve", "--json", "--reason", "ok", prefix))
        self.assertEqual(result["requestId"], "3f2a9c01de")
        self.assertEqual(
            (result["state"], result["decidedBy"], result["stored"]),
            ("approved", self.owner.fingerprint, True),
        )
        self.assertEqual(result["peer"]["fingerprint"], self.billingNew.fingerprint)
        stored = self.successResultOf(self.store.lookup(self.billingNew.fingerprint))
        assert stored is not None
        self.assertEqual(SignedDecision.decode(stored.decision).reason, "ok")

    def test_blockDecidedKey(self) -> None:
        """
        A key with no pending request is found among the decided ones.
        """
        out = self.decide("block", self.billing.fingerprint[:15])
        self.assertTrue(out.startswith("blocked acme/billing"), out)
        self.assertIn("for acme/ledger", out)
        self.assertEqual(
            self.store.peers[self.billing.fingerprint].state, KeyState.blocked
        )

    def test_alreadyDecided(self) -> None:
        """
        Approving an approved key says so, and signs nothing.
        """
        before = self.store.peers[self.billing.fingerprint]
        out = self.decide("approve", self.billing.fingerprint)
        self.assertEqual(
            out, f"acme/billing {self.billing.fingerprint} is already approved\n"
        )
        self.assertEqual(self.store.peers[self.billing.fingerprint], before)

    def test_deny(self) -> None:
        self.decide("deny", "--yes", "3F2A")
        self.assertEqual(
            self.store.peers[self.billingNew.fingerprint].state, KeyState.denied
        )

    def test_revokeIgnoresPending(self) -> None:
        """
        C{revoke} looks only among decided keys, and the other commands look
        among pending requests first: a prefix that begins both a request's ID
        and a decided key's fingerprint means the decided key to C{revoke},
        and the request to C{deny}.
        """
        shared = self.billing.fingerprint[7:17]
        other = peerOf(makeIdentity("acme", "payroll"))
        self.addPending(other, shared)
        self.decide("revoke", shared[:8])
        self.assertEqual(
            self.store.peers[self.billing.fingerprint].state, KeyState.revoked
        )
        self.decide("deny", shared[:8])
        self.assertEqual(self.store.peers[other.fingerprint].state, KeyState.denied)


class _Child(ProcessProtocol):
    """
    A child process whose output is kept, line by line.
    """

    def __init__(self, onLine: Callable[[str, str], None] | None = None) -> None:
        self.out = b""
        self.err = b""
        self.onLine = onLine
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._received("out", data)

    def errReceived(self, data: bytes) -> None:
        self._received("err", data)

    def _received(self, stream: str, data: bytes) -> None:
        before = getattr(self, stream)
        setattr(self, stream, before + data)
        if self.onLine is not None:
            for line in data.decode().splitlines():
                self.onLine(stream, line)

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(0)
        elif reason.check(ProcessTerminated):
            value = reason.value
            assert isinstance(value, ProcessTerminated)
            self.ended.callback(value.exitCode if value.exitCode is not None else -1)
        else:
            self.ended.errback(reason)


class RealCommandTests(TestCase):
    """
    The C{dwtrust} command, as a child process, against a control endpoint on
    a UNIX socket that this process serves with dwtrust.
    """

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.directory = temporaryDirectory(self)
        self.daemon = makeIdentity("acme", "ledger")
        self.owner = makeIdentity("acme", "alice")
        self.ownerDirectory = self.directory.child("owner")
        self.owner.save(self.ownerDirectory)
        self.store = MemoryTrustStore()
        self.bus = ControlBus()
        self.owners = Signers([self.owner.publicKey])
        self.socket = self.directory.child("control.sock").path
        authenticator = Authenticator(
            self.daemon, OwnersOnlyPolicy(self.owners), None, reactor
        )
        port: IListeningPort = await authenticator.serverEndpoint(
            serverFromString(reactor, f"unix:{self.socket}")
        ).listen(
            controlFactory(
                decisionsFor(self.daemon, self.store, self.owners, self.bus), self.bus
            )
        )
        self.addCleanup(port.stopListening)
        self.billing = makeIdentity("acme", "billing")
        self.peer = PeerIdentity("acme", "billing", self.billing.publicKey)

    def spawn(
        self,
        *argv: str,
        identity: str | None = None,
        onLine: Callable[[str, str], None] | None = None,
    ) -> _Child:
        child = _Child(onLine)
        reactor.spawnProcess(
            child,
            DWTRUST,
            [
                DWTRUST,
                argv[0],
                "--control",
                f"unix:{self.socket}",
                "--identity",
                identity or self.ownerDirectory.path,
                *argv[1:],
            ],
            env=os.environ,
        )
        return child

    async def dwtrust(
        self, *argv: str, identity: str | None = None
    ) -> tuple[int, str, str]:
        child = self.spawn(*argv, identity=identity)
        status = await child.ended
        return status, child.out.decode(), child.err.decode()

    async def test_decide(self) -> None:
        """
        An owner lists the pending request, approves it by a prefix of its ID
        (which wakes the connection waiting for it, with the owner's signed
        decision), sees the key among the peers, and revokes it by a prefix of
        its fingerprint; the store holds each decision with its signature.
        """
        await self.store.addPending(
            self.peer, "10.1.2.3:40000", "3f2a9c01de", 2e9, 10, 100
        )
        waiting = self.bus.waitFor(self.peer.fingerprint)

        status, out, err = await self.dwtrust("pending", "--json")
        self.assertEqual((status, err), (OK, ""))
        listed = json.loads(out)
        self.assertEqual(
            (listed["service"], listed["total"], listed["omitted"]),
            ("acme/ledger", 1, 0),
        )
        self.assertEqual(listed["pending"][0]["requestId"], "3f2a9c01de")

        status, out, err = await self.dwtrust(
            "approve", "--reason", "the new billing box", "--json", "3f2a"
        )
        self.assertEqual((status, err), (OK, ""))
        result = json.loads(out)
        self.assertEqual(result["requestId"], "3f2a9c01de")
        self.assertEqual(result["state"], "approved")
        decision = self.successResultOf(waiting)
        self.assertEqual(
            (decision.state, decision.signer, decision.reason),
            ("approved", self.owner.fingerprint, "the new billing box"),
        )
        stored = self.successResultOf(self.store.lookup(self.peer.fingerprint))
        assert stored is not None
        self.assertEqual((stored.state, stored.sequence), (KeyState.approved, 1))
        self.owners.verify(
            SignedDecision.decode(stored.decision),
            "acme/ledger",
            self.daemon.fingerprint,
        )

        status, out, err = await self.dwtrust("peers")
        self.assertEqual((status, err), (OK, ""))
        self.assertIn("approved", out)
        self.assertIn(self.owner.fingerprint, out)

        status, out, err = await self.dwtrust("revoke", self.peer.fingerprint[:15])
        self.assertEqual((status, err), (OK, ""))
        self.assertTrue(out.startswith("revoked acme/billing"), out)
        stored = self.successResultOf(self.store.lookup(self.peer.fingerprint))
        assert stored is not None
        self.assertEqual((stored.state, stored.sequence), (KeyState.revoked, 2))
        self.assertEqual(SignedDecision.decode(stored.decision).state, "revoked")

    async def test_unknownAndAmbiguous(self) -> None:
        """
        An unknown prefix, or one that matches several requests, fails with
        status 1 and says which; nothing is decided.
        """
        other = makeIdentity("acme", "payroll")
        await self.store.addPending(self.peer, "a:1", "3f2a9c01de", 2e9, 10, 100)
        await self.store.addPending(
            PeerIdentity("acme", "payroll", other.publicKey),
            "a:1",
            "3f77000000",
            2e9,
            10,
            100,
        )
        status, _, err = await self.dwtrust("deny", "3f")
        self.assertEqual(status, FAILED)
        self.assertIn("'3f' matches 2 requests", err)
        self.assertIn("3f2a9c01de", err)
        self.assertIn("3f77000000", err)
        status, _, err = await self.dwtrust("block", "zz")
        self.assertEqual(status, FAILED)
        self.assertIn("no pending request or known key matches 'zz'", err)
        status, _, err = await self.dwtrust("revoke", "3f2a")
        self.assertEqual(status, FAILED)
        self.assertIn("pending request, with no decision to revoke", err)
        self.assertEqual(
            {r.state for r in self.store.peers.values()}, {KeyState.pending}
        )

    async def test_nonOwner(self) -> None:
        """
        A key that is not a registered owner's is refused: status 3, naming
        the refusal.
        """
        stranger = makeIdentity("acme", "mallory")
        strangerDirectory = self.directory.child("stranger")
        stranger.save(strangerDirectory)
        status, out, err = await self.dwtrust(
            "pending", identity=strangerDirectory.path
        )
        self.assertEqual(status, REFUSED, err)
        self.assertIn("denied", err)
        self.assertIn("not a registered owner", err)
        self.assertEqual(out, "")

    async def test_watch(self) -> None:
        """
        C{watch --json} prints each control message as one JSON line as it
        arrives, and ends with status 0 on SIGINT.
        """
        started: Deferred[None] = Deferred()
        lines: list[str] = []
        arrived: Deferred[None] = Deferred()

        def onLine(stream: str, line: str) -> None:
            if stream == "err" and "watching" in line and not started.called:
                started.callback(None)
            if stream == "out":
                lines.append(line)
                if not arrived.called:
                    arrived.callback(None)

        child = self.spawn("watch", "--json", onLine=onLine)
        await started
        message = ControlMessage(
            "approval_requested",
            "acme/ledger",
            self.peer.fingerprint,
            org="acme",
            peerService="billing",
            requestId="3f2a9c01de",
            time=T0,
        )
        self.bus.publish(message)
        await arrived
        self.assertEqual(json.loads(lines[0]), messageJSON(message))
        self.assertEqual(
            json.loads(lines[0])["peer"],
            {
                "organization": "acme",
                "service": "billing",
                "algorithm": "",
                "fingerprint": self.peer.fingerprint,
            },
        )
        os.kill(child.transport.pid, signal.SIGINT)  # type: ignore[union-attr]
        self.assertEqual(await child.ended, OK, child.err)

    async def test_recordedDecisionShown(self) -> None:
        """
        C{pending} shows the key already approved for the same org/service,
        so that an owner sees an identity change.
        """
        await recordDecision(
            self.store, self.owner, self.daemon, self.peer, KeyState.approved
        )
        replacement = makeIdentity("acme", "billing", slot="replacement")
        await self.store.addPending(
            PeerIdentity("acme", "billing", replacement.publicKey),
            "10.1.2.4:1",
            "77aa000000",
            2e9,
            10,
            100,
        )
        status, out, err = await self.dwtrust("pending")
        self.assertEqual((status, err), (OK, ""))
        self.assertIn(
            f"acme/billing already has approved key {self.peer.fingerprint}", out
        )
