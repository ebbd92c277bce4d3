"""
The command-line conventions shared by C{dwtrust} and C{twistd dwtrust}
(docs/cli.rst): options and arguments in any order, C{--version}, one-line
usage errors with status 2, confirmation for short prefixes in destructive
commands, one JSON vocabulary, and clean JSON audit lines.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from importlib import metadata
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.python import usage
from twisted.python.filepath import FilePath

import dwtrust
from dwtrust import Identity
from dwtrust.cli import USAGE, Options, main
from dwtrust.cli._owners import _checkShortPrefix, _DecideOptions
from dwtrust.control import Listing
from dwtrust.tap import Options as DaemonOptions
from dwtrust.tap import auditLine

from .processes import (
    DEADLINE,
    DWTRUST,
    TWISTD,
    EchoServer,
    describe,
    finish,
    run_cli,
)
from .test_e2e_owners import (
    Site,
    approveHeld,
    requested,
)
from .test_e2e_owners import echo as echo
from .test_e2e_owners import made as made
from .test_e2e_owners import site as site

# Options and arguments in any order


#: For every subcommand: its arguments with the options after them, and
#: what the parsed options must hold.
AFTER = {
    "keygen": (
        ["--org", "acme", "--identity", "/tmp/i", "--service", "billing", "--json"],
        {"org": "acme", "service": "billing", "identity": "/tmp/i", "json": 1},
    ),
    "show": (["--json", "--identity", "/tmp/i"], {"identity": "/tmp/i", "json": 1}),
    "connect": (
        ["127.0.0.1:7443", "--identity", "/tmp/i", "--strict"],
        {"address": "127.0.0.1:7443", "identity": "/tmp/i", "strict": 1},
    ),
    "forget": (
        ["127.0.0.1:7443", "--identity", "/tmp/i"],
        {"address": "127.0.0.1:7443", "identity": "/tmp/i"},
    ),
    "pin": (
        ["127.0.0.1:7443", "--replace", "./ledger.pub", "--identity", "/tmp/i"],
        {
            "address": "127.0.0.1:7443",
            "key": "./ledger.pub",
            "identity": "/tmp/i",
            "replace": 1,
        },
    ),
    "pending": (["--json", "--control", "/tmp/c.sock"], {"json": 1}),
    "approve": (
        ["3f2a9c01", "--control", "/tmp/c.sock", "--reason", "ok"],
        {"target": "3f2a9c01", "reason": "ok", "control": "unix:/tmp/c.sock"},
    ),
    "deny": (
        ["3f2a9c01", "--control", "/tmp/c.sock", "-r", "no"],
        {"target": "3f2a9c01", "reason": "no"},
    ),
    "block": (
        ["3f2a9c01", "--control", "/tmp/c.sock", "--yes"],
        {"target": "3f2a9c01", "yes": 1},
    ),
    "revoke": (
        ["SHA256:abcdefgh", "--control", "/tmp/c.sock", "--timeout", "5"],
        {"target": "SHA256:abcdefgh", "timeout": 5.0},
    ),
    "peers": (["--json", "--identity", "/tmp/o"], {"identity": "/tmp/o"}),
    "watch": (["--json", "--control=/tmp/c.sock"], {"json": 1}),
    "add-owner": (
        ["/tmp/alice.pub", "--identity", "/tmp/i"],
        {"owner-key": "/tmp/alice.pub", "identity": "/tmp/i"},
    ),
    "join-token": (["--ttl", "5m", "--control", "/tmp/c.sock"], {"ttl": 300.0}),
    "clone": (["--identity", "/tmp/n", "--join", "-"], {"join": "-"}),
    "request-key": (
        ["127.0.0.1:7443", "--identity", "/tmp/r", "--into", "/tmp/k"],
        {"address": "127.0.0.1:7443", "identity": "/tmp/r"},
    ),
    "migrate": (["--store", "/tmp/s.sqlite3"], {"store": "/tmp/s.sqlite3"}),
    "instantiate": (
        [
            "--org",
            "acme",
            "--identity",
            "/tmp/c",
            "--service",
            "m",
            "--server-identity",
            "/tmp/s",
        ],
        {"org": "acme", "server-identity": "/tmp/s"},
    ),
}


def test_everySubcommandCovered() -> None:
    """
    The table of L{test_optionsAfterArguments} covers every subcommand.
    """
    assert sorted(AFTER) == sorted(c[0] for c in Options.subCommands)


@pytest.mark.parametrize("command", sorted(AFTER))
def test_optionsAfterArguments(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Every subcommand takes its options after its arguments (and between
    them), as git and ssh do.
    """
    monkeypatch.setattr("sys.stdin", StringIO("a join token"))
    argv, expected = AFTER[command]
    options = Options()
    options.parseOptions([command, *argv])
    assert options.subCommand == command
    parsed = options.subOptions
    for key, value in expected.items():
        assert parsed[key] == value, (key, parsed[key])


def test_doubleDashEndsOptions() -> None:
    """
    After C{--}, an argument that looks like an option is an argument.
    """
    options = Options()
    options.parseOptions(["approve", "--control", "/tmp/c", "--", "--json"])
    assert options.subOptions["target"] == "--json"
    assert not options.subOptions["json"]


def test_topLevelStopsAtCommand() -> None:
    """
    The options after the command's name are the command's, even when
    C{dwtrust} itself has one of that name (C{--help}, C{--version}).
    """
    options = Options()
    options.parseOptions(["show", "--json"])
    assert options.subCommand == "show"


def test_daemonOptionsAnyOrder() -> None:
    """
    C{twistd dwtrust} parses its options GNU-style too: an option's value
    may be attached or given after C{=}, in any order.
    """
    options = DaemonOptions()
    options.parseOptions(["--timeout=5", "--max-pending", "7", "-l", "tcp:0"])
    assert (options["timeout"], options["max-pending"]) == (5.0, 7)
    assert options["listen"] == "tcp:0"


def test_realProcessesOptionsAfterArguments(tmp_path: Path) -> None:
    """
    A real C{dwtrust}: C{keygen} with its options in any order, C{show}
    with C{--json} after C{--identity}, and C{forget HOST:PORT --identity}.
    """
    directory = str(tmp_path / "i")
    created = run_cli(
        "keygen", "--service", "billing", "--identity", directory, "--org", "acme"
    )
    assert created.returncode == 0, describe(created)
    shown = run_cli("show", "--identity", directory, "--json")
    assert shown.returncode == 0, describe(shown)
    assert json.loads(shown.stdout)["service"] == "billing"
    forgot = run_cli("forget", "127.0.0.1:7443", "--identity", directory)
    assert forgot.returncode == 1, describe(forgot)
    assert b"no key is pinned for 127.0.0.1:7443" in forgot.stderr


# Versions


def test_version() -> None:
    """
    C{dwtrust.__version__} is the installed distribution's version, and
    C{dwtrust --version} and C{twistd dwtrust --version} print it (not
    Twisted's).
    """
    assert dwtrust.__version__ == metadata.version("dwtrust")
    done = run_cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"dwtrust {dwtrust.__version__}\n".encode(),
        b"",
    ), describe(done)
    daemon = subprocess.run(
        [TWISTD, "dwtrust", "--version"], capture_output=True, timeout=DEADLINE * 4
    )
    assert daemon.returncode == 0, describe(daemon)
    assert daemon.stdout == f"dwtrust {dwtrust.__version__}\n".encode()


# Usage errors


def assertUsageError(
    done: subprocess.CompletedProcess[bytes], program: str, *expected: str
) -> None:
    """
    C{done} ended with status 2, and said so in one line and a hint, and
    nothing else.
    """
    assert done.returncode == USAGE, describe(done)
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 2, describe(done)
    assert lines[0].startswith(f"{program}: error: "), describe(done)
    assert lines[1] == f"Try '{program} --help'.", describe(done)
    for text in expected:
        assert text in lines[0], describe(done)
    assert done.stdout == b"", describe(done)


@pytest.mark.parametrize(
    ("argv", "program", "expected"),
    [
        (["approve", "--control", "/tmp/c"], "dwtrust approve", "arguments"),
        (["approve", "abc", "--timeout", "-5"], "dwtrust approve", "--timeout"),
        (["approve", "abc", "--timeout", "inf"], "dwtrust approve", "--timeout"),
        (["pending", "--bogus"], "dwtrust pending", "unknown option --bogus"),
        (["join-token", "--ttl", "0"], "dwtrust join-token", "--ttl"),
        (["join-token", "--ttl", "2d"], "dwtrust join-token", "--ttl"),
        (["join-token", "--ttl", "25h"], "dwtrust join-token", "24h"),
        (["frobnicate"], "dwtrust", "unknown command 'frobnicate'"),
        ([], "dwtrust", "give a command"),
    ],
)
def test_usageErrors(argv: list[str], program: str, expected: str) -> None:
    """
    A usage error, in any command, is one line naming the command and a
    hint where its help is, with status 2.
    """
    out, err = StringIO(), StringIO()
    assert main(argv, out, err) == USAGE
    lines = err.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{program}: error: ") and expected in lines[0], lines
    assert lines[1] == f"Try '{program} --help'."
    assert out.getvalue() == ""


def test_realUsageErrors(tmp_path: Path) -> None:
    """
    Real processes: C{dwtrust} and C{twistd dwtrust}, while parsing options
    and (for the daemon) while checking them as it builds itself, exit 2
    with one line, not the whole help.
    """
    assertUsageError(
        run_cli("revoke", "--control", "/tmp/x", "--timeout", "soon"),
        "dwtrust revoke",
        "--timeout",
    )

    def twistd(*argv: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [TWISTD, "--pidfile", "", "-n", "dwtrust", *argv],
            capture_output=True,
            timeout=DEADLINE * 4,
            cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path)},
        )

    assertUsageError(twistd("--max-pending", "0"), "twistd dwtrust", "--max-pending")
    assertUsageError(
        twistd("--decision-timeout", "x"), "twistd dwtrust", "--decision-timeout"
    )
    assertUsageError(twistd("extra"), "twistd dwtrust", "arguments")
    identity = str(tmp_path / "identity")
    assertUsageError(
        twistd("--identity", identity, "--listen", "bogus:1"),
        "twistd dwtrust",
        "bad endpoint description",
    )


def test_usageLines() -> None:
    """
    A command's help begins with a usage line that names it.
    """
    options = Options()
    options.parseOptions(["approve", "x1234567", "--control", "/c"])
    assert str(options.subOptions).splitlines()[0] == (
        "Usage: dwtrust approve [options] ID"
    )
    assert str(DaemonOptions()).splitlines()[0] == "Usage: twistd dwtrust [options]"


def test_daemonHelpHasNoStraySpaces() -> None:
    """
    C{twistd dwtrust --help} wraps every text with single spaces: no runs of
    spaces inside a description.
    """
    text = str(DaemonOptions())
    for line in text.splitlines():
        body = re.sub(r"^\s*(-\w, )?(--[\w-]+=?)?\s*", "", line)
        assert "  " not in body, line


# Short prefixes for destructive commands


class _Client:
    """
    What L{_checkShortPrefix} asks of a control client.
    """

    def __init__(self, pending: list[dict[str, Any]], peers: list[dict[str, Any]]):
        self._pending, self._peers = pending, peers

    def pending(self, prefix: str) -> Deferred[Listing]:
        return succeed(Listing(tuple(self._pending), len(self._pending)))

    def peers(self, prefix: str) -> Deferred[Listing]:
        return succeed(Listing(tuple(self._peers), len(self._peers)))


def _entry(fingerprint: str, service: str) -> dict[str, Any]:
    return {"fingerprint": fingerprint, "org": "acme", "service": service}


def test_shortPrefixAmbiguousListsCandidates() -> None:
    """
    A short prefix that matches a request and a decided key both is refused
    with the candidates listed, even with C{--yes}.
    """
    options = Options()
    options.parseOptions(["block", "SHA256:Ab", "--yes", "--control", "/c"])
    command = options.subOptions
    assert isinstance(command, _DecideOptions)
    one, two = "SHA256:Ab" + "1" * 41, "SHA256:Ab" + "2" * 41
    client = _Client([_entry(one, "billing")], [_entry(two, "payroll")])
    failure = Deferred.fromCoroutine(
        _checkShortPrefix(client, command, _entry(one, "billing"))  # type: ignore[arg-type]
    )
    errors: list[Exception] = []
    failure.addErrback(lambda f: errors.append(f.value))
    [error] = errors
    assert "matches 2" in str(error) and one in str(error) and two in str(error)


def _revoke(site: Site, target: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run_cli(
        "revoke",
        target,
        "--control",
        site.control,
        "--identity",
        str(site.path("alice")),
        *extra,
    )


def test_shortPrefixNeedsConfirmation(site: Site, echo: EchoServer) -> None:
    """
    Against a real daemon: C{dwtrust revoke SHA256:C} (one character) does
    not revoke, and says what to do; nor does C{block}; with C{--yes} it
    does; at a terminal, the answer decides.  A prefix of 8 characters
    needs no confirmation.
    """
    billing, payroll = site.fp("billing"), site.fp("payroll")
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
        approveHeld(site, daemon, "payroll")
        short = billing[: len("SHA256:") + 1]

        refused = _revoke(site, short)
        assert refused.returncode == 1, describe(refused)
        assert b"shorter than 8 characters" in refused.stderr, describe(refused)
        assert b"--yes" in refused.stderr, describe(refused)
        blocked = run_cli(
            "block",
            short,
            "--control",
            site.control,
            "--identity",
            str(site.path("alice")),
        )
        assert blocked.returncode == 1, describe(blocked)
        assert site.peers()[billing][0] == "approved"

        # At a terminal, "n" leaves the key alone.
        answered = _atTerminal(site, short, b"n\n")
        assert answered[0] == 1, answered
        assert b"[y/N]" in answered[1], answered
        assert site.peers()[billing][0] == "approved"

        revoked = _revoke(site, short, "--yes")
        assert revoked.returncode == 0, describe(revoked)
        assert f"revoked acme/billing {billing}".encode() in revoked.stdout
        assert site.peers()[billing][0] == "revoked"

        eight = _revoke(site, payroll[: len("SHA256:") + 8])
        assert eight.returncode == 0, describe(eight)
        assert site.peers()[payroll][0] == "revoked"
        del daemon


def _atTerminal(site: Site, target: str, answer: bytes) -> tuple[int, bytes]:
    """
    Run C{dwtrust revoke TARGET} with its standard input and error on a
    terminal; answer its question with C{answer}; its status and what it
    wrote there.
    """
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [
            DWTRUST,
            "revoke",
            target,
            "--control",
            site.control,
            "--identity",
            str(site.path("alice")),
        ],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    seen = b""
    end = time.monotonic() + DEADLINE * 2
    try:
        while b"[y/N]" not in seen and time.monotonic() < end:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
        os.write(controller, answer)
        done = finish(process)
        while True:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if not ready:
                break
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(controller)
    return done.returncode, seen


# The JSON vocabulary

IDENTITY = {"organization", "service", "algorithm", "fingerprint"}
#: Names the vocabulary replaced: none may appear.
RETIRED = {"id", "org", "peerService", "public_key", "signer", "decision"}
CAMEL = re.compile(r"[a-z][a-zA-Z0-9]*")


def assertVocabulary(value: Any, where: str = "") -> None:
    """
    C{value} speaks the vocabulary of docs/cli.rst: camelCase keys, none of
    the retired ones, and every C{peer} an identity.
    """
    if isinstance(value, list):
        for item in value:
            assertVocabulary(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            assert CAMEL.fullmatch(key), (where, key)
            assert key not in RETIRED, (where, key)
            if key == "peer":
                assert IDENTITY <= set(item) <= IDENTITY | {"publicKey"}, (where, item)
            assertVocabulary(item, f"{where}.{key}")


def test_jsonVocabulary(tmp_path: Path, site: Site, echo: EchoServer) -> None:
    """
    C{keygen}, C{show}, C{pending}, C{watch}, C{approve}, C{peers} and
    C{revoke} with C{--json}, against a real daemon, all speak one
    vocabulary: an identity is organization/service/algorithm/fingerprint
    (and publicKey), the key asking is C{peer}, the service is C{service} at
    the top, a request is C{requestId}.
    """
    key = str(tmp_path / "new")
    created = run_cli(
        "keygen", "--json", "--identity", key, "--org", "acme", "--service", "x"
    )
    assert created.returncode == 0, describe(created)
    madeFacts = json.loads(created.stdout)
    assert set(madeFacts) == IDENTITY | {"publicKey"}, madeFacts
    shown = json.loads(run_cli("show", "--identity", key, "--json").stdout)
    assert shown == madeFacts
    assert madeFacts["fingerprint"] == Identity.load(FilePath(key)).fingerprint

    billing = site.fp("billing")
    alice = ["--control", site.control, "--identity", str(site.path("alice"))]
    with site.daemon(echo) as daemon:
        watch = subprocess.Popen(
            [DWTRUST, "watch", "--json", *alice],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert watch.stderr is not None
            assert b"watching" in watch.stderr.readline()
            held = site.start_connect("billing", daemon)
            requested(daemon, billing)

            pending = json.loads(run_cli("pending", "--json", *alice).stdout)
            assertVocabulary(pending, "pending")
            [entry] = pending["pending"]
            assert pending["service"] == "acme/ledger"
            assert entry["peer"]["fingerprint"] == billing
            assert entry["peer"]["service"] == "billing"

            approved = run_cli("approve", entry["requestId"][:4], "--json", *alice)
            assert approved.returncode == 0, describe(approved)
            decision = json.loads(approved.stdout)
            assertVocabulary(decision, "approve")
            assert (decision["service"], decision["state"]) == (
                "acme/ledger",
                "approved",
            )
            assert decision["requestId"] == entry["requestId"]
            assert decision["peer"]["fingerprint"] == billing
            assert finish(held).returncode == 0

            peers = json.loads(run_cli("peers", "--json", *alice).stdout)
            assertVocabulary(peers, "peers")
            assert [p["peer"]["fingerprint"] for p in peers["peers"]] == [billing]

            revoked = run_cli("revoke", billing, "--json", *alice)
            assert revoked.returncode == 0, describe(revoked)
            assertVocabulary(json.loads(revoked.stdout), "revoke")
            daemon.wait_for_log(r"control message decided")
        finally:
            watch.send_signal(2)
            out, _ = watch.communicate(timeout=DEADLINE)
        messages = [json.loads(line) for line in out.decode().splitlines()]
        assert messages, out
        for message in messages:
            assertVocabulary(message, "watch")
            assert message["service"] == "acme/ledger"
        assert billing in {m["peer"]["fingerprint"] for m in messages}


# Audit lines

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def assertCleanAuditLine(line: str) -> dict[str, Any]:
    """
    C{line} is one clean audit event; return it.
    """
    event = json.loads(line)
    assert isinstance(event, dict), line
    assert ISO.fullmatch(event["time"]), line
    assert isinstance(event["event"], str) and event["event"].startswith("dwtrust.")
    assert event["level"] in {"debug", "info", "warn", "error", "critical"}, line
    assert isinstance(event["text"], str) and event["text"], line
    for key in event:
        assert not key.startswith(("log_", "__")), (key, line)
    return event


def test_auditLineShape() -> None:
    """
    L{auditLine} keeps the event's own fields and drops Twisted's envelope;
    a failure becomes its C{error} text.
    """
    from twisted.logger import LogLevel
    from twisted.python.failure import Failure

    event = {
        "log_format": "dwtrust: {what} for {who}",
        "log_time": 1_700_000_000.25,
        "log_level": LogLevel.warn,
        "log_logger": object(),
        "log_source": None,
        "log_namespace": "dwtrust.test",
        "log_failure": Failure(ValueError("bad")),
        "__class_uuid__": "x",
        "event": "dwtrust.test",
        "what": "a thing",
        "who": {"fingerprint": "SHA256:x"},
    }
    line = auditLine(event)
    assert line.endswith("\n") and line.count("\n") == 1
    facts = assertCleanAuditLine(line)
    assert facts == {
        "time": "2023-11-14T22:13:20.250Z",
        "event": "dwtrust.test",
        "level": "warn",
        "text": "dwtrust: a thing for {'fingerprint': 'SHA256:x'}",
        "what": "a thing",
        "who": {"fingerprint": "SHA256:x"},
        "error": "bad",
    }


def test_auditLinesClean(site: Site, echo: EchoServer) -> None:
    """
    Every line a real daemon's C{--audit-log} gets is clean JSON: ISO 8601
    time, the event's name, level and text, its own fields, and no
    C{log_*} or C{__class_uuid__}.
    """
    with site.daemon(echo) as daemon:
        approveHeld(site, daemon, "billing")
    lines = site.audit.read_text().splitlines()
    assert lines
    events = [assertCleanAuditLine(line) for line in lines]
    names = {e["event"] for e in events}
    assert "dwtrust.control.approval_requested" in names, names
    [request] = [
        e for e in events if e["event"] == "dwtrust.control.approval_requested"
    ]
    assert request["fingerprint"] == site.fp("billing")
    assert "unpersistable" not in site.audit.read_text()


def test_usageErrorNamesInnermost() -> None:
    """
    A L{usage.UsageError} from a subcommand's parser carries that
    subcommand's options, so that the message names it.
    """
    options = Options()
    with pytest.raises(usage.UsageError) as raised:
        options.parseOptions(["peers", "--timeout", "0"])
    assert raised.value.options.commandName() == "dwtrust peers"  # type: ignore[attr-defined]
