"""
End-to-end tests of C{dwtrust connect}'s exit statuses and messages, of
C{--expect-fingerprint}, and of C{dwtrust pin}: real C{twistd dwtrust} and
C{dwtrust} processes on loopback.

The statuses (documented in C{docs/daemon.rst}): 0 done, 1 failed, 2 usage,
3 refused, 4 timed out, 5 unreachable, 6 the application behind the daemon
is down, 7 revoked, 130 interrupted.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .processes import (
    DEADLINE,
    LOOPBACK,
    PRIVATE_KEY,
    STORE,
    Connected,
    Daemon,
    EchoServer,
    Lines,
    connect,
    describe,
    finish,
    keygen,
    refusing_port,
    run_cli,
    start_session,
    wait_for,
)

HELLO = b"hello\n"


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """
    The identities, made once: acme/ledger (the service), acme/billing (a
    client), alice (an owner) and another key claiming acme/ledger.
    """
    base = tmp_path_factory.mktemp("made")
    names = {
        "ledger": ("acme", "ledger"),
        "billing": ("acme", "billing"),
        "impostor": ("acme", "billing"),
        "alice": ("acme", "alice"),
        "fakeLedger": ("acme", "ledger"),
    }
    for name, (org, service) in names.items():
        keygen(base / name, org, service)
    return {name: base / name for name in names}


@pytest.fixture
def ids(tmp_path: Path, identities: dict[str, Path]) -> dict[str, Path]:
    """
    This test's own copies of the identities (so that trust stores start
    empty).
    """
    import shutil

    copies = {}
    for name, path in identities.items():
        copies[name] = tmp_path / "ids" / name
        shutil.copytree(path, copies[name])
    return copies


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def fingerprint(identity: Path) -> str:
    done = run_cli("show", "--identity", str(identity), "--json")
    assert done.returncode == 0, describe(done)
    value: str = json.loads(done.stdout)["fingerprint"]
    return value


def jsonOutcome(stderr: str) -> dict[str, Any]:
    """
    The JSON object C{--json} printed as the last line of standard error.
    """
    result: dict[str, Any] = json.loads(stderr.strip().splitlines()[-1])
    return result


def assertExit(result: Connected, status: int, *texts: str) -> None:
    assert result.status == status, str(result)
    for text in texts:
        assert text in result.stderr, f"{text!r} not in:\n{result}"
    assert "Traceback" not in result.stderr, str(result)


def ownerDaemon(
    tmp_path: Path, ids: dict[str, Path], forward: str, *more: str
) -> Daemon:
    return Daemon(
        tmp_path / "daemon",
        "--identity",
        str(ids["ledger"]),
        "--forward",
        forward,
        "--owner",
        str(ids["alice"] / f"{PRIVATE_KEY}.pub"),
        *more,
    )


def owner(ids: dict[str, Path], *args: str) -> subprocess.CompletedProcess[bytes]:
    control = f"unix:{ids['ledger'] / 'control.sock'}"
    return run_cli(
        args[0], "--control", control, "--identity", str(ids["alice"]), *args[1:]
    )


# The daemon's answers


def test_done(tmp_path: Path, ids: dict[str, Path], echo: EchoServer) -> None:
    """
    A completed exchange exits 0, and C{--json} says C{done} and names the
    server.
    """
    with ownerDaemon(tmp_path, ids, echo.forward, "--approver", "auto") as daemon:
        result = connect(ids["billing"], daemon.address, "--json")
    assertExit(result, 0)
    assert result.stdout == HELLO, str(result)
    outcome = jsonOutcome(result.stderr)
    assert outcome == {
        "address": daemon.address,
        "status": 0,
        "outcome": "done",
        "reason": None,
        "message": None,
        "peer": {
            "organization": "acme",
            "service": "ledger",
            "algorithm": "ssh-ed25519",
            "fingerprint": fingerprint(ids["ledger"]),
        },
    }, outcome


@contextmanager
def answersAndCloses(reply: bytes) -> Iterator[str]:
    """
    An application on loopback that reads one request, writes C{reply} and
    closes first, as an HTTP/1.0 server does; yields its C{--forward}
    endpoint description.
    """
    server = socket.create_server((LOOPBACK, 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                peer, _ = server.accept()
            except TimeoutError:
                continue
            with peer:
                peer.settimeout(DEADLINE)
                peer.recv(65536)
                peer.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp:host={LOOPBACK}:port={server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


def test_applicationClosesFirst(tmp_path: Path, ids: dict[str, Path]) -> None:
    """
    When the application answers and closes first, the daemon ends the TLS
    session cleanly (C{close_notify}), so the client sees the whole answer,
    an orderly end, and exits 0, not "the connection was cut".
    """
    reply = b"HTTP/1.0 200 OK\r\n\r\nhello from the ledger\n"
    with (
        answersAndCloses(reply) as application,
        ownerDaemon(tmp_path, ids, application, "--approver", "auto") as daemon,
    ):
        result = connect(ids["billing"], daemon.address, "--json", input=b"GET /\n")
    assertExit(result, 0)
    assert result.stdout == reply, str(result)
    assert jsonOutcome(result.stderr)["outcome"] == "done", result.stderr


def test_applicationDown(tmp_path: Path, ids: dict[str, Path]) -> None:
    """
    When the application behind the daemon cannot be reached, the daemon
    refuses the (trusted) client before accepting it, and C{connect} exits 6
    at once, naming the address, without waiting for its standard input to
    close.
    """
    with (
        refusing_port() as dead,
        ownerDaemon(
            tmp_path, ids, f"tcp:host={LOOPBACK}:port={dead}", "--approver", "auto"
        ) as daemon,
    ):
        session = start_session(
            "connect", "--identity", str(ids["billing"]), "--json", daemon.address
        )
        try:
            status = session.wait(timeout=DEADLINE * 2)
            out, err = session.communicate()
        finally:
            if session.poll() is None:
                session.kill()
                session.communicate()
    result = Connected(status, out, err.decode())
    assertExit(
        result,
        6,
        daemon.address,
        "the application behind this service cannot be reached",
    )
    assert result.stdout == b"", str(result)
    outcome = jsonOutcome(result.stderr)
    assert (outcome["status"], outcome["outcome"], outcome["reason"]) == (
        6,
        "application_down",
        "unavailable",
    ), outcome


def test_revoked(tmp_path: Path, ids: dict[str, Path], echo: EchoServer) -> None:
    """
    When an owner revokes the client's key while C{connect} runs, the daemon
    closes the session and C{connect} exits 7, saying so.
    """
    billing = fingerprint(ids["billing"])
    with ownerDaemon(tmp_path, ids, echo.forward, "--approver", "auto") as daemon:
        session = start_session(
            "connect", "--identity", str(ids["billing"]), "--json", daemon.address
        )
        output = Lines(session.stdout)
        try:
            assert session.stdin is not None
            session.stdin.write(HELLO)
            session.stdin.flush()
            output.wait_for(r"^hello$")
            revoked = owner(ids, "revoke", billing)
            assert revoked.returncode == 0, describe(revoked)
            status = session.wait(timeout=DEADLINE * 2)
            err = session.stderr.read().decode() if session.stderr else ""
        finally:
            if session.poll() is None:
                session.kill()
            session.wait(timeout=DEADLINE)
            assert session.stdin is not None
            session.stdin.close()
    result = Connected(status, b"", err)
    assertExit(result, 7, daemon.address, "revoked this client's key")
    outcome = jsonOutcome(err)
    assert (outcome["outcome"], outcome["reason"]) == ("revoked", "revoked"), outcome


def test_interruptWhileHeld(
    tmp_path: Path, ids: dict[str, Path], echo: EchoServer
) -> None:
    """
    While held for its owners' approval, C{connect} says what it waits for
    and how to give up; SIGINT then ends it with 130.
    """
    billing = fingerprint(ids["billing"])
    with ownerDaemon(tmp_path, ids, echo.forward) as daemon:
        session = start_session(
            "connect", "--identity", str(ids["billing"]), "--json", daemon.address
        )
        errors = Lines(session.stderr)
        try:
            # (A version 2 client learns who the server is only once it is
            # accepted.)
            errors.wait_for(
                rf"waiting for (acme/ledger's|the service's) owners at"
                rf" {daemon.address} to approve"
                rf" this key \({re.escape(billing)}\) — Ctrl-C to give up"
            )
            assert session.poll() is None
            session.send_signal(signal.SIGINT)
            status = session.wait(timeout=DEADLINE)
            errors.join()
        finally:
            if session.poll() is None:
                session.kill()
            session.wait(timeout=DEADLINE)
            assert session.stdin is not None
            session.stdin.close()
    result = Connected(status, b"", errors.text())
    assertExit(result, 130, daemon.address, "interrupted")
    outcome = jsonOutcome(result.stderr)
    assert outcome["outcome"] == "interrupted", outcome
    assert echo.connections() == 0


@contextmanager
def silentServer() -> Iterator[int]:
    """
    A port that accepts connections and never says anything.
    """
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        for connection in held:
            connection.close()


def test_neverAnswers(ids: dict[str, Path]) -> None:
    """
    A server that accepts the connection and says nothing: C{connect} gives
    up after C{--timeout} and exits 4.
    """
    with silentServer() as port:
        address = f"{LOOPBACK}:{port}"
        result = connect(ids["billing"], address, "--timeout", "1", "--json")
    assertExit(result, 4, address, "timed out")
    assert jsonOutcome(result.stderr)["outcome"] == "timeout"


@contextmanager
def answeringServer(answer: bytes, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """
    A port whose server (plain, or TLS with C{tls}) sends C{answer} to each
    connection and closes it.
    """
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            try:
                if tls is not None:
                    connection.settimeout(DEADLINE)
                    connection = tls.wrap_socket(connection, server_side=True)
                connection.sendall(answer)
                if tls is not None:
                    connection.recv(1024)
            except OSError:
                pass
            finally:
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def tlsContext(directory: Path) -> ssl.SSLContext:
    """
    An ordinary TLS server's context, with a self-signed certificate.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "cert.pem").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


def test_plainTCPServer(ids: dict[str, Path]) -> None:
    """
    A server that does not speak TLS is not a dwtrust service: exit 5, one
    sentence, no OpenSSL error tuples.
    """
    with answeringServer(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        address = f"{LOOPBACK}:{port}"
        result = connect(ids["billing"], address)
    assertExit(result, 5, address, "is not a dwtrust service")
    assert "[(" not in result.stderr and "SSL" not in result.stderr, str(result)
    assert len(result.stderr.strip().splitlines()) == 1, str(result)


def test_ordinaryTLSServer(tmp_path: Path, ids: dict[str, Path]) -> None:
    """
    An ordinary TLS server that is not dwtrust: exit 5, "is not a dwtrust
    service", and not Twisted's "Connection was closed cleanly".
    """
    context = tlsContext(tmp_path / "tls")
    with answeringServer(b"HTTP/1.1 400 Bad Request\r\n\r\n", context) as port:
        address = f"{LOOPBACK}:{port}"
        result = connect(ids["billing"], address)
    assertExit(result, 5, address, "is not a dwtrust service")
    assert "closed cleanly" not in result.stderr, str(result)


def test_unreachable(ids: dict[str, Path]) -> None:
    """
    Nothing listens at the address: exit 5, naming it.
    """
    with refusing_port() as port:
        address = f"{LOOPBACK}:{port}"
        result = connect(ids["billing"], address, "--json")
    assertExit(result, 5, address, "the connection was refused")
    assert jsonOutcome(result.stderr)["outcome"] == "unreachable"
    assert jsonOutcome(result.stderr)["peer"] is None


def test_unknownHost(ids: dict[str, Path]) -> None:
    """
    A host name that does not resolve (C{.invalid} never does): exit 5.
    """
    result = connect(ids["billing"], "no-such-host.invalid:7443")
    assertExit(result, 5, "no-such-host.invalid:7443", "cannot resolve")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["127.0.0.1"], "'127.0.0.1' has no port: give HOST:PORT"),
        (["127.0.0.1:70000"], "the port 70000 is out of range"),
        (["127.0.0.1:0"], "the port 0 is out of range"),
        (["tcp:host=127.0.0.1"], "is not a usable client endpoint description"),
        (["tcp:host=127.0.0.1:port=99999"], "the port 99999 is out of range"),
        (["tcp:host=127.0.0.1:port=x"], "is not a usable client endpoint"),
        (["nope:thing"], "is neither HOST:PORT nor a client endpoint description"),
        (["--timeout", "-5", "127.0.0.1:7443"], "--timeout: invalid value"),
        (["--timeout", "0", "127.0.0.1:7443"], "--timeout: invalid value"),
        (["--timeout", "inf", "127.0.0.1:7443"], "--timeout: invalid value"),
        (["--timeout", "soon", "127.0.0.1:7443"], "--timeout: invalid value"),
        (["--quit-after", "-1", "127.0.0.1:7443"], "--quit-after: invalid value"),
        (
            ["--expect-fingerprint", "SHA256:abc", "127.0.0.1:7443"],
            "is not a SHA256:... fingerprint",
        ),
    ],
)
def test_usageErrors(ids: dict[str, Path], arguments: list[str], message: str) -> None:
    """
    Bad addresses and numbers are usage errors (2), each one plain sentence
    with no Python internals.
    """
    result = connect(ids["billing"], *arguments[-1:], *arguments[:-1])
    assertExit(result, 2, message)
    error, hint = result.stderr.strip().splitlines()
    assert error.startswith("dwtrust connect: error: "), str(result)
    assert message in error, str(result)
    assert hint == "Try 'dwtrust connect --help'.", str(result)
    for internal in ["Unknown endpoint type", "connect_ex", "__init__", "int()"]:
        assert internal not in result.stderr, str(result)


# Pins


def test_expectFingerprint(
    tmp_path: Path, ids: dict[str, Path], echo: EchoServer
) -> None:
    """
    C{--expect-fingerprint} refuses a server with another key (3, both
    fingerprints shown, nothing pinned), and accepts the right one, which is
    then pinned as on first use (so C{--strict} passes after).
    """
    ledger, other = fingerprint(ids["ledger"]), fingerprint(ids["fakeLedger"])
    with ownerDaemon(tmp_path, ids, echo.forward, "--approver", "auto") as daemon:
        refused = connect(
            ids["billing"], daemon.address, "--expect-fingerprint", other, "--json"
        )
        assertExit(refused, 3, daemon.address, ledger, other, "--expect-fingerprint")
        assert refused.stdout == b"", str(refused)
        strict = connect(ids["billing"], daemon.address, "--strict")
        assertExit(strict, 3, "strict checking is on")

        accepted = connect(
            ids["billing"],
            daemon.address,
            "--expect-fingerprint",
            other,
            "--expect-fingerprint",
            ledger,
        )
        assertExit(accepted, 0)
        assert accepted.stdout == HELLO, str(accepted)
        again = connect(ids["billing"], daemon.address, "--strict")
        assertExit(again, 0)


def test_pin(tmp_path: Path, ids: dict[str, Path], echo: EchoServer) -> None:
    """
    C{dwtrust pin} pins a server's key in advance: C{--strict} then accepts
    it; a pinned key that is not the server's is refused with
    C{identity_changed}; a different pin is not replaced without
    C{--replace}; a bare fingerprint is a usage error.
    """
    pub = str(ids["ledger"] / f"{PRIVATE_KEY}.pub")
    fake = str(ids["fakeLedger"] / f"{PRIVATE_KEY}.pub")
    billing = str(ids["billing"])
    with ownerDaemon(tmp_path, ids, echo.forward, "--approver", "auto") as daemon:
        address = daemon.address
        pinned = run_cli("pin", "--identity", billing, address, fake)
        assert pinned.returncode == 0, describe(pinned)
        assert fingerprint(ids["fakeLedger"]) in pinned.stdout.decode()
        changed = connect(ids["billing"], address)
        assertExit(changed, 3, "identity_changed", "dwtrust forget")

        kept = run_cli("pin", "--identity", billing, address, pub)
        assert kept.returncode == 1, describe(kept)
        assert b"give --replace" in kept.stderr, describe(kept)

        replaced = run_cli("pin", "--identity", billing, "--replace", address, pub)
        assert replaced.returncode == 0, describe(replaced)
        strict = connect(ids["billing"], address, "--strict")
        assertExit(strict, 0)
        assert strict.stdout == HELLO

        bare = run_cli(
            "pin", "--identity", billing, address, fingerprint(ids["ledger"])
        )
        assert bare.returncode == 2, describe(bare)
        assert b"--expect-fingerprint" in bare.stderr, describe(bare)
    assert (ids["billing"] / STORE).exists()


def test_pinNeedsName(tmp_path: Path, ids: dict[str, Path]) -> None:
    """
    A public-key file whose comment is not ORG/SERVICE needs C{--name}.
    """
    line = (ids["ledger"] / f"{PRIVATE_KEY}.pub").read_text().split()
    bare = tmp_path / "bare.pub"
    bare.write_text(" ".join(line[:2]) + "\n")
    billing = str(ids["billing"])
    done = run_cli("pin", "--identity", billing, "127.0.0.1:7443", str(bare))
    assert done.returncode == 1, describe(done)
    assert b"--name ORG/SERVICE" in done.stderr, describe(done)
    named = run_cli(
        "pin",
        "--identity",
        billing,
        "--name",
        "acme/ledger",
        "127.0.0.1:7443",
        str(bare),
    )
    assert named.returncode == 0, describe(named)
    assert b"pinned acme/ledger" in named.stdout, describe(named)


def test_identityChangedAboutClient(
    tmp_path: Path, ids: dict[str, Path], echo: EchoServer
) -> None:
    """
    When the service refuses the client's key with C{identity_changed} (it
    knows acme/billing with another key), the hint is about the client's
    key, not a changed server key, and does not suggest C{forget}.
    """
    billing = fingerprint(ids["billing"])
    with ownerDaemon(tmp_path, ids, echo.forward) as daemon:
        held = start_session(
            "connect", "--identity", str(ids["billing"]), daemon.address
        )
        try:
            wait_for(
                lambda: (
                    billing in daemon.log() and "approval_requested" in daemon.log()
                ),
                "the request for billing's key",
                why=daemon.report,
            )
            approved = owner(ids, "approve", billing)
            assert approved.returncode == 0, describe(approved)
            assert held.stdin is not None
            held.stdin.write(HELLO)
            held.stdin.close()
            held.stdin = None
            done = finish(held)
        finally:
            if held.poll() is None:
                held.kill()
                held.wait()
        assert done.returncode == 0, describe(done)
        result = connect(ids["impostor"], daemon.address)
    assertExit(
        result,
        3,
        daemon.address,
        "the server refused this client: identity_changed",
        "it knows this client's name with another key",
        "owners must revoke the old key",
    )
    assert "dwtrust forget" not in result.stderr, str(result)
    assert "the service presented a different key" not in result.stderr


def test_json_refused(tmp_path: Path, ids: dict[str, Path], echo: EchoServer) -> None:
    """
    A refusal's C{--json} object has status 3, C{refused}, and the code.
    """
    with ownerDaemon(tmp_path, ids, echo.forward, "--approver", "known-only") as daemon:
        result = connect(ids["billing"], daemon.address, "--json")
    assertExit(result, 3, "the server refused this client: denied")
    outcome = jsonOutcome(result.stderr)
    assert (outcome["status"], outcome["outcome"], outcome["reason"]) == (
        3,
        "refused",
        "denied",
    ), outcome
    # Version 2: the server proves itself only to clients it accepts.
    assert outcome["peer"] is None, outcome
