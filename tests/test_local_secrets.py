"""
End to end, with real processes: local secrets stay local (issue 11,
findings 8 to 11).

- A join token never travels in a command line, which every local user can
  read: C{--join TOKEN} is refused by C{twistd dwtrust} and C{dwtrust clone}
  before anything is dialled or written; C{--join -} and a 0600
  C{--join-file} work; a file others can read is refused.  A used token that
  comes back is reported to the owners.
- Credentials in a webhook's URL never reach a log, and may come from a
  0600 file instead.
- The identity directory is made 0700, and its files and control socket
  0600, so that another local user can neither read the store nor reach
  the socket.
- A client sidecar listens on loopback unless told otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .processes import (
    DEADLINE,
    LOOPBACK,
    PRIVATE_KEY,
    STORE,
    Daemon,
    EchoServer,
    Lines,
    connect,
    describe,
    keygen,
    run_cli,
    run_twistd,
    start_session,
    wait_for,
)
from .test_clone import Site, assertNothingWritten, clone

HELLO = b"hello\n"
NEWEST = "newest-decisions.sqlite3"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    base = tmp_path_factory.mktemp("identities")
    names = {
        "ledger": ("acme", "ledger"),
        "alice": ("acme", "alice"),
        "billing": ("acme", "billing"),
    }
    return {
        name: (base / name, keygen(base / name, org, service))
        for name, (org, service) in names.items()
    }


@pytest.fixture
def site(tmp_path: Path, made: dict[str, tuple[Path, str]]) -> Site:
    return Site(tmp_path, made)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def secretFile(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def joinEvents(site: Site) -> list[dict[str, Any]]:
    """
    The running instance's audit events of joins attempted (not of tokens
    issued).
    """
    return [
        e
        for e in site.audited()
        if str(e.get("event")).startswith("dwtrust.join.")
        and e["event"] != "dwtrust.join.token_issued"
    ]


# Finding 8: join tokens never in argv.


def test_cloneRefusesArgvToken(site: Site, echo: EchoServer) -> None:
    """
    C{dwtrust clone --join TOKEN} is a usage error (status 2) with a
    one-line message that says how to pass the token, and never repeats it;
    nothing is written and nothing is dialled: the running instance hears
    no join, and the token still works from standard input.
    """
    with site.daemon(echo) as original:
        token = site.joinToken()
        done = run_cli("clone", "--join", token, "--identity", str(site.path("argv")))
        assert done.returncode == 2, describe(done)
        err = done.stderr.decode()
        [line] = [x for x in err.splitlines() if x.startswith("dwtrust clone: error: ")]
        assert "--join-file PATH" in line and "chmod 600" in line, err
        assert "can be read by every local user" in line, err
        assert token not in err + done.stdout.decode(), err
        assertNothingWritten(site.path("argv"))
        assert joinEvents(site) == []

        done = clone(site, token, site.path("stdin"))
        assert done.returncode == 0, describe(done)
        original.wait_for_log(r"joined acme/ledger with a join token")


def test_twistdRefusesArgvToken(site: Site, echo: EchoServer) -> None:
    """
    C{twistd dwtrust --join TOKEN} exits with the usage status (2) and
    a message that says how to pass the token, before anything is written
    or dialled; the token still works afterwards.
    """
    with site.daemon(echo):
        token = site.joinToken()
        done = run_twistd(
            "-n",
            "--logfile",
            "-",
            "dwtrust",
            "--identity",
            str(site.path("argv")),
            "--join",
            token,
            # Were the token taken, the daemon would stop at this bad
            # endpoint with another message, rather than run on.
            "--forward",
            "nonsense:",
            cwd=site.base,
        )
        output = (done.stdout + done.stderr).decode()
        assert done.returncode == 2, describe(done)
        assert "a token on the command line can be read by every local user" in (
            output
        ), output
        assert "Traceback" not in output, output
        assert token not in output, output
        assertNothingWritten(site.path("argv"))
        assert joinEvents(site) == []
        done = clone(site, token, site.path("stdin"))
        assert done.returncode == 0, describe(done)


def test_joinFileReadableByOthersRefused(site: Site, echo: EchoServer) -> None:
    """
    A C{--join-file} that group or others can read (0644) is refused by both
    commands, with a message that says to chmod 600; nothing is written and
    the token is not spent.
    """
    with site.daemon(echo):
        token = site.joinToken()
        tokenFile = secretFile(site.base / "token", token, 0o644)
        done = run_cli(
            "clone", "--join-file", str(tokenFile), "--identity", str(site.path("c"))
        )
        err = done.stderr.decode()
        assert done.returncode == 2, describe(done)
        assert (
            "has mode 0644, so others can read it; make it yours alone with"
            f" chmod 600 {tokenFile}" in err
        ), err
        assert token not in err
        assertNothingWritten(site.path("c"))

        done = run_twistd(
            "-n",
            "--logfile",
            "-",
            "dwtrust",
            "--identity",
            str(site.path("t")),
            "--join-file",
            str(tokenFile),
            cwd=site.base,
        )
        output = (done.stdout + done.stderr).decode()
        assert done.returncode == 2, describe(done)
        assert "has mode 0644, so others can read it" in output, output
        assert token not in output
        assertNothingWritten(site.path("t"))
        assert joinEvents(site) == []

        tokenFile.chmod(0o600)
        done = run_cli(
            "clone", "--join-file", str(tokenFile), "--identity", str(site.path("c"))
        )
        assert done.returncode == 0, describe(done)


def _scanCommandLines(
    token: bytes, stop: threading.Event, seen: dict[str, Any]
) -> None:
    """
    Read every process's command line, over and over, until C{stop}: the
    lines that hold C{token} go to C{seen["leaks"]}; those of the joining
    daemon (C{--join-file}) are counted in C{seen["joining"]}.
    """
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    line = f.read()
            except OSError:
                continue
            if token in line:
                seen["leaks"].append(line)
            if b"--join-file" in line:
                seen["joining"] += 1


def test_joinFileEndToEndTokenNeverInArgv(site: Site, echo: EchoServer) -> None:
    """
    C{twistd dwtrust --join-file FILE} (0600) joins and serves as the
    service; while it runs, no process's command line (C{/proc/PID/cmdline})
    holds the token, though the scan saw the joining daemon's.
    """
    newDir = site.path("joined")
    with site.daemon(echo) as original:
        site.approve("billing", original)
        token = site.joinToken()
        tokenFile = secretFile(site.base / "token", token)
        options = (
            "--identity",
            str(newDir),
            "--join-file",
            str(tokenFile),
            "--forward",
            echo.forward,
            "--control",
            f"unix:{newDir / 'control.sock'}",
        )
        stop = threading.Event()
        seen: dict[str, Any] = {"leaks": [], "joining": 0}
        scanner = threading.Thread(
            target=_scanCommandLines, args=(token.encode(), stop, seen)
        )
        scanner.start()
        try:
            with Daemon(site.path("joined-daemon"), *options) as joined:
                accepted = connect(site.path("billing"), joined.address, input=HELLO)
                assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
        finally:
            stop.set()
            scanner.join()
        original.wait_for_log(r"joined acme/ledger with a join token")
    assert seen["leaks"] == [], seen["leaks"]
    assert seen["joining"] > 0, seen

    # Started again once the spent token's file is gone, it runs on the key
    # it has.
    tokenFile.unlink()
    with Daemon(site.path("joined-daemon"), *options) as again:
        accepted = connect(site.path("billing"), again.address, input=HELLO)
        assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)


def test_reusedTokenTellsOwners(site: Site, echo: EchoServer) -> None:
    """
    A join token presented again after it was used is refused, and the
    owners hear of it: C{dwtrust watch --json} prints a
    C{join_token_reused} message with the second key's fingerprint and
    source, and the audit log has a C{dwtrust.join.reused} event naming the
    instance that used it first.
    """
    with site.daemon(echo) as original:
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
            token = site.joinToken()
            first = clone(site, token, site.path("first"))
            assert first.returncode == 0, describe(first)
            second = clone(site, token, site.path("second"))
            assert second.returncode != 0, describe(second)
            assert b"already used" in second.stderr, describe(second)
            assertNothingWritten(site.path("second"))
            messages.wait_for(r'"kind": "join_token_reused"')
            original.wait_for_log(r"a used join token came back")
        finally:
            watch.send_signal(signal.SIGINT)
            watch.wait(timeout=DEADLINE)
            messages.join()
            errors.join()
    [alert] = [
        m
        for m in (json.loads(line) for line in messages.lines())
        if m["kind"] == "join_token_reused"
    ]
    assert alert["service"] == "acme/ledger", alert
    assert alert["source"].startswith(f"{LOOPBACK}:"), alert
    [reused] = [e for e in site.audited() if e.get("event") == "dwtrust.join.reused"]
    [cloned] = [e for e in site.audited() if e.get("event") == "dwtrust.join.cloned"]
    assert reused["fingerprint"] == alert["peer"]["fingerprint"], (reused, alert)
    assert reused["used_by"] == cloned["fingerprint"], (reused, cloned)
    assert reused["fingerprint"] != cloned["fingerprint"], reused
    assert reused["source"] == alert["source"], (reused, alert)


# Finding 9: webhook credentials stay out of logs.


class _Webhook:
    """
    A local HTTP server that approves every request and records the path
    and C{Authorization} header of each.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        calls = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                calls.append((self.path, self.headers.get("Authorization", "")))
                body = json.dumps({"decision": "approve"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever)

    def __enter__(self) -> _Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


PASSWORD = "pw-9f3c1e77"
QUERY_TOKEN = "qt-5ab2d8c0"
BEARER = "bearer-71e0c3aa"


def everythingLogged(daemon: Daemon, site: Site, *more: str) -> str:
    return "\n".join(
        [daemon.log(), daemon.output.read_text(), site.audit.read_text(), *more]
    )


def test_webhookURLCredentialsRedacted(site: Site, echo: EchoServer) -> None:
    """
    With a webhook URL holding a password and a C{?token=}, a client the
    webhook approves gets through, the webhook receives both secrets, and
    neither appears in the twistd log, the daemon's output, the audit log or
    the client's output; the start-up line shows the URL masked.
    """
    with _Webhook() as hook:
        url = f"http://bot:{PASSWORD}@{LOOPBACK}:{hook.port}/hook?token={QUERY_TOKEN}"
        with site.daemon(echo, "original", "--approver", f"webhook:{url}") as daemon:
            accepted = connect(site.path("billing"), daemon.address, input=HELLO)
            assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
            logged = everythingLogged(daemon, site, str(accepted))
    assert hook.requests, "the webhook was never called"
    path, authorization = hook.requests[0]
    assert path == f"/hook?token={QUERY_TOKEN}", path
    assert (
        authorization
        == "Basic " + base64.b64encode(f"bot:{PASSWORD}".encode()).decode()
    ), authorization
    assert f"webhook:http://bot:***@{LOOPBACK}:{hook.port}/hook?token=***" in (
        daemon.log()
    ), daemon.log()
    assert "give them with --webhook-auth-file instead" in daemon.log()
    assert PASSWORD not in logged, logged
    assert QUERY_TOKEN not in logged, logged


def test_webhookAuthFromFile(site: Site, echo: EchoServer) -> None:
    """
    C{--webhook-auth-file} (0600) gives the webhook's Authorization header
    apart from its URL: the webhook receives it, no log holds it.  The same
    file readable by others is refused with a message that says chmod 600,
    and nothing is written.
    """
    authFile = secretFile(site.base / "auth", f"Bearer {BEARER}", 0o640)
    with _Webhook() as hook:
        url = f"http://{LOOPBACK}:{hook.port}/hook"
        done = run_twistd(
            "-n",
            "--logfile",
            "-",
            "dwtrust",
            "--identity",
            str(site.path("never")),
            "--approver",
            f"webhook:{url}",
            "--webhook-auth-file",
            str(authFile),
            # Were the file taken, the daemon would stop at this bad endpoint
            # with another message, rather than run on.
            "--forward",
            "nonsense:",
            cwd=site.base,
        )
        output = (done.stdout + done.stderr).decode()
        assert done.returncode == 2, describe(done)
        assert (
            "has mode 0640, so others can read it; make it yours alone with"
            f" chmod 600 {authFile}" in output
        ), output
        assert BEARER not in output
        assert not site.path("never").exists()

        authFile.chmod(0o600)
        with site.daemon(
            echo,
            "original",
            "--approver",
            f"webhook:{url}",
            "--webhook-auth-file",
            str(authFile),
        ) as daemon:
            accepted = connect(site.path("billing"), daemon.address, input=HELLO)
            assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
            logged = everythingLogged(daemon, site, str(accepted))
    assert [a for _, a in hook.requests] == [f"Bearer {BEARER}"], hook.requests
    assert BEARER not in logged, logged


# Finding 10: the identity directory is private.


def modes(directory: Path) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.lstat().st_mode)
        for p in directory.iterdir()
        if stat.S_ISREG(p.lstat().st_mode) or stat.S_ISSOCK(p.lstat().st_mode)
    }


def asNobody(*command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """
    A directory every local user can reach (C{/tmp/...}, 0755), unlike
    pytest's own temporary directories (0700), so that a test of what
    another user can read tests the identity directory's own mode.
    """
    path = Path(tempfile.mkdtemp(prefix="dwtrust-secrets-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_identityDirectoryMadePrivate(public_tmp: Path, made: dict[str, Any]) -> None:
    """
    A pre-existing 0755 identity directory with a 0644 store and
    newest-decisions file: once the daemon runs, the directory is 0700, and
    every file in it (with the store's -wal and -shm, made as it runs) and
    the control socket are 0600; the daemon logs what it changed.  The user
    nobody can then neither read the store nor connect to the socket.
    """
    tmp_path = public_tmp
    directory = tmp_path / "id"
    shutil.copytree(made["ledger"][0], directory)
    with Daemon(tmp_path / "first", "--identity", str(directory)):
        pass
    directory.chmod(0o755)
    for path in directory.iterdir():
        if path.name != PRIVATE_KEY and path.is_file():
            path.chmod(0o644)
    assert {STORE, NEWEST} <= set(modes(directory))
    # The set-up is a real exposure: nobody can read the store now.
    assert asNobody("cat", str(directory / STORE)).returncode == 0
    with Daemon(tmp_path / "second", "--identity", str(directory)) as daemon:
        socketPath = directory / "control.sock"
        wait_for(lambda: socketPath.exists(), "the control socket")
        daemon.wait_for_log(
            r"had mode 0755, readable by other local users; it is now 0700"
        )
        # The store's -wal and -shm files appear once its database thread
        # has opened it, which a loaded machine may take a moment to do.
        wait_for(
            lambda: all(
                (directory / name).exists() for name in (f"{STORE}-wal", f"{STORE}-shm")
            ),
            "the store's -wal and -shm files",
            why=daemon.report,
        )
        found = modes(directory)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert {"control.sock", f"{STORE}-wal", f"{STORE}-shm"} <= set(found), found
        assert found == dict.fromkeys(found, 0o600), found

        read = asNobody("cat", str(directory / STORE))
        assert read.returncode != 0 and b"Permission denied" in read.stderr, read
        reached = asNobody(
            "python3",
            "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX);"
            " s.connect(sys.argv[1])",
            str(socketPath),
        )
        assert reached.returncode != 0, reached
        assert b"PermissionError" in reached.stderr, reached
        # As this user, the socket is still there to use.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(socketPath))


def test_newIdentityIsPrivate(tmp_path: Path) -> None:
    """
    A daemon that makes its identity and store afresh makes them private
    too, whatever umask it started with: the store, its -wal and -shm files,
    the newest-decisions file and the socket are 0600.
    """
    directory = tmp_path / "fresh"
    old = os.umask(0o022)
    try:
        with Daemon(tmp_path / "run", "--identity", str(directory)):
            wait_for(
                lambda: all(
                    (directory / name).exists()
                    for name in (f"{STORE}-wal", f"{STORE}-shm", "control.sock")
                ),
                "the store's -wal and -shm files and the control socket",
            )
            found = modes(directory)
    finally:
        os.umask(old)
    assert {STORE, f"{STORE}-wal", f"{STORE}-shm", NEWEST, "control.sock"} <= set(
        found
    ), found
    private = {name: mode for name, mode in found.items() if not name.endswith(".pub")}
    assert private == dict.fromkeys(private, 0o600), found


# Finding 11: the sidecar listens on loopback by default.


def listeningSockets(daemon: Daemon) -> list[tuple[str, int]]:
    """
    The TCP sockets the daemon's process listens on: each one's local
    address (as hex, as C{/proc/net/tcp} and C{tcp6} show it) and port.
    """
    assert daemon._process is not None
    pid = daemon._process.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ["/proc/net/tcp", "/proc/net/tcp6"]:
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, hexPort = fields[1].split(":")
                if fields[3] == "0A" and fields[9] in inodes:
                    found.append((address, int(hexPort, 16)))
    return found


def test_sidecarDefaultsToLoopback(tmp_path: Path, made: dict[str, Any]) -> None:
    """
    C{--connect tcp:0=REMOTE} listens on 127.0.0.1 only, and says so.
    """
    with Daemon(
        tmp_path / "d",
        "--identity",
        str(made["billing"][0]),
        "--control",
        f"unix:{tmp_path / 'control.sock'}",
        "--connect",
        f"tcp:0={LOOPBACK}:1",
        listen=False,
    ) as daemon:
        [(address, port)] = listeningSockets(daemon)
        assert address == "0100007F", (address, port)
        with socket.socket() as s:
            s.settimeout(5)
            s.connect((LOOPBACK, port))
    assert "client sidecar tcp:0:interface=127.0.0.1 -> 127.0.0.1:1" in daemon.log()


def test_sidecarPublicNeedsOption(tmp_path: Path, made: dict[str, Any]) -> None:
    """
    A sidecar local endpoint on a non-loopback interface is refused with a
    one-line message naming C{--connect-public}, before anything is
    written; with C{--connect-public} it binds there.
    """
    identity = tmp_path / "id"
    options = [
        "--identity",
        str(identity),
        "--connect",
        f"tcp:0:interface=0.0.0.0={LOOPBACK}:1",
    ]
    done = run_twistd(
        "-n",
        "--logfile",
        "-",
        "dwtrust",
        *options,
        # Were the endpoint taken, the daemon would stop at this audit log,
        # which cannot be opened, with another message, rather than run on.
        "--audit-log",
        str(tmp_path / "no" / "such" / "dir" / "audit"),
        cwd=tmp_path,
    )
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 2, describe(done)
    assert "listens on 0.0.0.0, not loopback" in output, output
    assert "add --connect-public if that is meant" in output, output
    assert "Traceback" not in output, output
    assert not identity.exists()

    with Daemon(
        tmp_path / "d",
        *options,
        "--connect-public",
        "--control",
        f"unix:{tmp_path / 'control.sock'}",
        listen=False,
    ) as daemon:
        [(address, port)] = listeningSockets(daemon)
        assert address == "00000000", (address, port)


def test_webhookAuthFromEnvironment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    C{--webhook-auth-env NAME} takes the Authorization value from the
    environment, and the webhook approver sends it; an unset variable, both
    sources at once, credentials in the URL as well, or no webhook at all
    are refused with one line.
    """
    from twisted.python import usage

    from dwtrust.approval import approverFromSpecs
    from dwtrust.tap import Options

    def parsed(*args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    hook = "webhook:https://hooks.example/approve"
    monkeypatch.setenv("HOOK_AUTH", f"Bearer {BEARER}")
    options = parsed("--approver", hook, "--webhook-auth-env", "HOOK_AUTH")
    assert options.webhookAuthorization == f"Bearer {BEARER}"
    approver: Any = approverFromSpecs(
        options["approvers"], webhookAuthorization=options.webhookAuthorization
    )
    assert approver._headers[b"Authorization"] == [f"Bearer {BEARER}".encode()]
    assert BEARER not in repr(approver) + approver.name

    monkeypatch.delenv("HOOK_AUTH")
    refusals = {
        "the environment variable HOOK_AUTH is not set": [
            "--approver",
            hook,
            "--webhook-auth-env",
            "HOOK_AUTH",
        ],
        "not both": [
            "--approver",
            hook,
            "--webhook-auth-env",
            "HOOK_AUTH",
            "--webhook-auth-file",
            "/nonexistent",
        ],
        "need a --approver webhook:URL": ["--webhook-auth-env", "PATH"],
    }
    for why, args in refusals.items():
        with pytest.raises(usage.UsageError) as raised:
            parsed(*args)
        assert why in str(raised.value), (why, raised.value)
        assert "\n" not in str(raised.value)
    with pytest.raises(
        ValueError, match=r"bot:\*\*\*@hooks.example.* holds credentials"
    ):
        approverFromSpecs(
            [f"webhook:https://bot:{PASSWORD}@hooks.example/approve"],
            webhookAuthorization="Bearer x",
        )
