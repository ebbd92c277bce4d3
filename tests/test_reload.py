"""
The service manager's side of a real C{twistd dwtrust}: C{SIGHUP} reloads
the owners (registered with C{dwtrust add-owner}, or given with C{--owner})
while a forwarded connection stays open, and systemd's readiness protocol
(C{sd_notify}) over a real datagram socket.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwtrust._systemd import notify

from .processes import (
    DEADLINE,
    Daemon,
    EchoServer,
    Lines,
    describe,
    finish,
    run_cli,
    start_cli,
    start_session,
)
from .test_status import HELLO, ledger_daemon, make_identity, pending_ids, public_key


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def hangup(daemon: Daemon) -> None:
    os.kill(int(daemon.pidfile.read_text()), signal.SIGHUP)


def owner_command(
    control: str, owner: Path, *args: str
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(args[0], "--control", control, "--identity", str(owner), *args[1:])


def approve_pending(control: str, owner: Path) -> None:
    [requestId] = pending_ids(control, owner)
    done = owner_command(control, owner, "approve", requestId)
    assert done.returncode == 0, describe(done)


def test_sighupPicksUpNewOwner(tmp_path: Path, echo: EchoServer) -> None:
    """
    An owner registered with C{dwtrust add-owner} while the daemon runs is
    refused on the control channel until C{SIGHUP}; after it, the daemon
    logs one line saying what changed, and the new owner lists and
    approves a held client.  A forwarded connection opened before the
    reload carries bytes before and after it, and closes normally.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    make_identity(alice, "acme", "alice")
    bobKey = make_identity(bob, "acme", "bob")
    make_identity(tmp_path / "billing", "acme", "billing")
    payrollKey = make_identity(tmp_path / "payroll", "acme", "payroll")
    control = f"unix:{tmp_path / 'ledger' / 'control.sock'}"
    with ledger_daemon(tmp_path, echo.forward, "--owner", public_key(alice)) as daemon:
        session = start_session(
            "connect", "--identity", str(tmp_path / "billing"), daemon.address
        )
        output = Lines(session.stdout)
        assert session.stdin is not None
        try:
            daemon.wait_for_log(r"control message approval_requested")
            approve_pending(control, alice)
            session.stdin.write(b"before\n")
            session.stdin.flush()
            output.wait_for(r"^before$")

            added = run_cli(
                "add-owner", "--identity", str(tmp_path / "ledger"), public_key(bob)
            )
            assert added.returncode == 0, describe(added)
            refused = owner_command(control, bob, "pending")
            assert refused.returncode != 0, describe(refused)

            hangup(daemon)
            daemon.wait_for_log(
                r"dwtrust: reloaded: 2 owner\(s\) \(1 added, 0 removed\)"
            )
            session.stdin.write(b"after\n")
            session.stdin.flush()
            output.wait_for(r"^after$")

            held = start_cli(
                "connect",
                "--identity",
                str(tmp_path / "payroll"),
                daemon.address,
                input=HELLO,
            )
            daemon.wait_for_log(
                rf"approval_requested about {re.escape(payrollKey.fingerprint)}"
            )
            approve_pending(control, bob)
            payroll = finish(held)
            assert payroll.returncode == 0 and payroll.stdout == HELLO, describe(
                payroll
            )
            assert bobKey.fingerprint in daemon.log()

            session.stdin.write(b"still\n")
            session.stdin.flush()
            output.wait_for(r"^still$")
        finally:
            session.stdin.close()
            session.stdin = None  # so that communicate() does not flush it
            done = finish(session)
        assert done.returncode == 0, describe(done)
        assert "dwtrust.reload.failed" not in daemon.log()


def test_reloadAllOrNothing(tmp_path: Path, echo: EchoServer) -> None:
    """
    An C{--owner} file that no longer holds a key: C{SIGHUP} changes
    nothing and logs one line naming the file.  Once it holds another
    owner's key, C{SIGHUP} swaps the owners: the old one is refused on the
    control channel, the new one admitted.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    make_identity(alice, "acme", "alice")
    make_identity(bob, "acme", "bob")
    ownerFile = tmp_path / "owner.pub"
    ownerFile.write_text(Path(public_key(alice)).read_text())
    control = f"unix:{tmp_path / 'ledger' / 'control.sock'}"
    with ledger_daemon(tmp_path, echo.forward, "--owner", str(ownerFile)) as daemon:
        ownerFile.write_text("not a key\n")
        hangup(daemon)
        line = daemon.wait_for_log(r"dwtrust: NOT reloaded: .*").group(0)
        assert str(ownerFile) in line, line
        assert "Traceback" not in daemon.log()
        done = owner_command(control, alice, "pending")
        assert done.returncode == 0, describe(done)

        ownerFile.write_text(Path(public_key(bob)).read_text())
        hangup(daemon)
        daemon.wait_for_log(r"reloaded: 1 owner\(s\) \(1 added, 1 removed\)")
        done = owner_command(control, bob, "pending")
        assert done.returncode == 0, describe(done)
        refused = owner_command(control, alice, "pending")
        assert refused.returncode != 0, describe(refused)


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_sdNotify(tmp_path: Path, echo: EchoServer, abstract: bool) -> None:
    """
    With C{NOTIFY_SOCKET} set, the daemon sends C{READY=1} once it has
    started (its port accepts connections by then), C{RELOADING=1} with
    C{MONOTONIC_USEC} and then C{READY=1} around a C{SIGHUP} reload, and
    C{STOPPING=1} when it stops: over a real datagram socket, in the
    abstract namespace (C{@name}) or at a path.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"dwtrust-test-{uuid.uuid4().hex}"
            listener.bind("\0" + name)
            address = "@" + name
        else:
            # A short path: AF_UNIX paths are limited to about 100 bytes.
            directory = tempfile.mkdtemp(prefix="dwn", dir="/tmp")
            address = os.path.join(directory, "notify")
            listener.bind(address)
        listener.settimeout(DEADLINE)
        try:
            daemon = Daemon(
                tmp_path / "d",
                "--identity",
                str(tmp_path / "ledger"),
                "--forward",
                echo.forward,
                env={"NOTIFY_SOCKET": address},
            )
            with daemon:
                assert listener.recv(4096) == b"READY=1"
                assert "listening on tcp:" in daemon.log()
                hangup(daemon)
                reloading = listener.recv(4096).decode()
                assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading
                assert int(reloading.rpartition("=")[2]) > 0
                assert listener.recv(4096) == b"READY=1"
            assert listener.recv(4096) == b"STOPPING=1"
        finally:
            if not abstract:
                os.unlink(address)
                os.rmdir(directory)


def test_notifyWithoutSocket() -> None:
    """
    Without C{NOTIFY_SOCKET}, or with one nobody listens on, notifying
    does nothing and raises nothing.
    """
    assert notify("READY=1", {}) is False
    assert (
        notify("READY=1", {"NOTIFY_SOCKET": "@dwtrust-nobody-" + uuid.uuid4().hex})
        is False
    )
    assert notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1"}) is False
