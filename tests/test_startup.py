"""
Starting C{twistd dwtrust} as a real process: every failure at start-up
exits non-zero at once with one line on standard error and leaves no
pidfile, in daemon mode and in the foreground; a second daemon for one
identity names the first one's pid; the daemon says where it listens and
what to do next; and a service account's everyday permission problems get
one line of advice, never a traceback, and never a new identity where an
old one could not be read.

The permission tests need a process that the kernel holds to file modes.
These tests usually run as root, which ignores modes, and the project's
Python may live where an unprivileged user cannot run it (under
C{/root}); so as root the process under test keeps uid 0 but loses the
capabilities that override file permissions (C{setpriv --bounding-set}),
which makes the kernel check modes for it as for any user, and directories
given to uid 65534 stand for another user's.  As an ordinary user the
processes run as they are.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet.endpoints import clientFromString

from dwtrust._startup import (
    TWISTD_LOGFILE,
    TWISTD_PIDFILE,
    _listenerKnown,
    describeTarget,
    lockHolder,
    placeDaemonFiles,
)

from .processes import (
    DWTRUST,
    LOOPBACK,
    TWISTD,
    Daemon,
    EchoServer,
    keygen,
    refusing_port,
    wait_for,
)

#: Seconds a start-up failure may take to end twistd (the issue's bound).
PROMPTLY = 10.0
#: Another user, for directories that are not ours.
NOBODY = 65534
#: What dropping root's rights over file permissions takes.
DROP = "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown"


def run(
    command: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    unprivileged: bool = False,
) -> subprocess.CompletedProcess[str]:
    """
    Run C{command} to its end, allowing it L{PROMPTLY} seconds: a start-up
    failure must not leave it waiting.
    """
    prefix = unprivilegedPrefix() if unprivileged else []
    try:
        return subprocess.run(
            [*prefix, *command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PROMPTLY,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{command!r} did not end within {PROMPTLY:g} s;"
            f" stdout {e.stdout!r}, stderr {e.stderr!r}"
        ) from None


def unprivilegedPrefix() -> list[str]:
    """
    The command prefix that makes a process subject to file modes: nothing
    for an ordinary user; for root, C{setpriv} without the capabilities
    that override them.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to drop root's file rights")
    if subprocess.run([setpriv, DROP, "--", "true"], check=False).returncode:
        pytest.skip("setpriv may not drop capabilities here")
    return [setpriv, DROP, "--"]


def needRoot() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a directory to another user")


def oneLine(done: subprocess.CompletedProcess[str]) -> str:
    """
    The one line a failed start-up wrote on standard error.
    """
    report = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode != 0, report
    lines = done.stderr.splitlines()
    assert len(lines) == 1, report
    assert "Traceback" not in done.stdout + done.stderr, report
    return lines[0]


@contextmanager
def busyPort() -> Iterator[int]:
    """
    A TCP port on 127.0.0.1 that another program listens on, for the block.
    """
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def twistd(*args: str, foreground: bool) -> list[str]:
    return [TWISTD, *(["-n"] if foreground else []), *args]


def liveDaemon(pidfile: Path) -> int:
    """
    Wait for a daemon started in daemon mode to write its pidfile; return
    its pid.
    """

    def written() -> int | None:
        try:
            return int(pidfile.read_text())
        except (OSError, ValueError):
            return None

    return wait_for(written, f"the daemon's pidfile {pidfile}")


def stopDaemon(pidfile: Path) -> None:
    """
    Stop a daemon started in daemon mode, and wait until it has removed its
    pidfile (it is not our child, so cannot be waited for).
    """
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        return
    wait_for(lambda: not pidfile.exists(), f"the daemon to remove {pidfile}")


# A port in use.


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_portInUse(tmp_path: Path, foreground: bool) -> None:
    """
    When the port to listen on is taken, C{twistd dwtrust} ends at once,
    with one line naming the port, exit status 1 and no pidfile, before it
    creates anything: in daemon mode as in the foreground.
    """
    identity = tmp_path / "identity"
    pidfile = tmp_path / "dwtrust.pid"
    with busyPort() as port:
        done = run(
            twistd(
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(tmp_path / "dwtrust.log"),
                "dwtrust",
                "--identity",
                str(identity),
                "--listen",
                f"tcp:{port}:interface={LOOPBACK}",
                foreground=foreground,
            ),
            tmp_path,
        )
    line = oneLine(done)
    assert line.startswith("twistd dwtrust: cannot listen on"), line
    assert f"{LOOPBACK} port {port}" in line, line
    assert "address already in use" in line, line
    assert done.returncode == 1
    assert not pidfile.exists()
    assert not identity.exists()


# A second daemon for one identity.


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_secondDaemon(tmp_path: Path, foreground: bool) -> None:
    """
    A second daemon for an identity another daemon serves ends at once with
    one line that names the first one's pid, and writes no pidfile; the
    first one runs on.  Both are started with twistd's default pid and log
    files, from different directories, which are then the identity
    directory's.
    """
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    options = ["dwtrust", "--identity", str(identity)]
    options += ["--listen", f"tcp:0:interface={LOOPBACK}"]
    started = run(twistd(*options, foreground=False), first)
    assert started.returncode == 0, started
    pidfile = identity / TWISTD_PIDFILE
    try:
        pid = liveDaemon(pidfile)
        wait_for(
            lambda: lockHolder(str(identity / "control.sock")) == pid,
            "the first daemon to hold its control socket",
        )
        assert (identity / TWISTD_LOGFILE).exists()
        done = run(twistd(*options, foreground=foreground), second)
        line = oneLine(done)
        assert line.startswith(
            f"twistd dwtrust: another dwtrust daemon (pid {pid}) already serves"
            f" the identity in {identity}"
        ), line
        assert f"kill {pid}" in line, line
        assert done.returncode == 1
        assert sorted(os.listdir(second)) == []
        assert sorted(os.listdir(first)) == []
        # The first one's pidfile is untouched, and it still runs.
        assert int(pidfile.read_text()) == pid
        os.kill(pid, 0)
    finally:
        stopDaemon(pidfile)


def test_pidfileInUse(tmp_path: Path) -> None:
    """
    A pidfile that names a live process is refused in one line that names
    it, instead of twistd's several lines; the pidfile is left as it was.
    """
    pidfile = tmp_path / "other.pid"
    with subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"]
    ) as other:
        try:
            pidfile.write_text(str(other.pid))
            done = run(
                twistd(
                    "--pidfile",
                    str(pidfile),
                    "dwtrust",
                    "--identity",
                    str(tmp_path / "identity"),
                    "--listen",
                    f"tcp:0:interface={LOOPBACK}",
                    foreground=False,
                ),
                tmp_path,
            )
        finally:
            other.kill()
    line = oneLine(done)
    assert line == (
        f"twistd dwtrust: another process (pid {other.pid}) runs with the"
        f" pidfile {pidfile}; stop it first (kill {other.pid}), or give twistd"
        " another --pidfile"
    )
    assert pidfile.read_text() == str(other.pid)


def test_twoIdentitiesOneDirectory(tmp_path: Path) -> None:
    """
    Two daemons for two identities, started from one directory with
    twistd's defaults, both run: each keeps its pid and log files in its
    identity directory.
    """
    pidfiles = []
    try:
        for name in ["ledger", "billing"]:
            identity = tmp_path / name
            done = run(
                twistd(
                    "dwtrust",
                    "--identity",
                    str(identity),
                    "--listen",
                    f"tcp:0:interface={LOOPBACK}",
                    foreground=False,
                ),
                tmp_path,
            )
            assert done.returncode == 0, done
            assert done.stderr == "", done
            pidfiles.append(identity / TWISTD_PIDFILE)
            liveDaemon(pidfiles[-1])
            assert (identity / TWISTD_LOGFILE).exists()
        assert not (tmp_path / TWISTD_PIDFILE).exists()
        assert not (tmp_path / TWISTD_LOGFILE).exists()
    finally:
        for pidfile in pidfiles:
            stopDaemon(pidfile)
        # Had they been left in the current directory.
        stopDaemon(tmp_path / TWISTD_PIDFILE)


# A failure after twistd has forked (not checked before: a UNIX socket with
# no lock, at a path that is taken).


def test_failureAfterForkDaemon(tmp_path: Path) -> None:
    """
    In daemon mode, a port that fails only once twistd has forked still
    ends the waiting parent at once with status 1 (twistd's report, which
    holds the start of the reason; the log holds all of it) and removes the
    pidfile the child wrote.
    """
    taken = tmp_path / "taken"
    taken.write_text("")
    pidfile = tmp_path / "dwtrust.pid"
    done = run(
        twistd(
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(tmp_path / "dwtrust.log"),
            "dwtrust",
            "--identity",
            str(tmp_path / "identity"),
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            "--control",
            f"unix:{taken}:lockfile=0",
            foreground=False,
        ),
        tmp_path,
    )
    assert done.returncode == 1, done
    # twistd's own report: two lines, with the reason cut at 100 bytes.
    assert "StartupError: cannot listen on the UNIX socket " in done.stderr, done
    assert not pidfile.exists()
    log = (tmp_path / "dwtrust.log").read_text()
    assert f"twistd dwtrust: cannot listen on the UNIX socket {taken}" in log


def test_failureAfterStartForeground(tmp_path: Path) -> None:
    """
    In the foreground, the same failure is one line on standard error (not
    in the log, where twistd sends C{sys.stderr}), exit status 1, and the
    pidfile twistd wrote is removed.
    """
    taken = tmp_path / "taken"
    taken.write_text("")
    pidfile = tmp_path / "dwtrust.pid"
    done = run(
        twistd(
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(tmp_path / "dwtrust.log"),
            "dwtrust",
            "--identity",
            str(tmp_path / "identity"),
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            "--control",
            f"unix:{taken}:lockfile=0",
            foreground=True,
        ),
        tmp_path,
    )
    line = oneLine(done)
    assert line == (
        f"twistd dwtrust: cannot listen on the UNIX socket {taken}:"
        " Address already in use"
    ), line
    assert done.returncode == 1
    assert not pidfile.exists()


# What the daemon says at start-up.


def test_saysWhatNext(tmp_path: Path) -> None:
    """
    The daemon says where it listens, warns when nothing accepts
    connections where it forwards, and, with no owner, gives the commands
    that make and register one.
    """
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    with (
        refusing_port() as nothing,
        Daemon(
            tmp_path,
            "--identity",
            str(identity),
            "--forward",
            f"tcp:host={LOOPBACK}:port={nothing}",
        ) as daemon,
    ):
        daemon.wait_for_log(
            rf"listening for dwtrust peers on {LOOPBACK} port {daemon.port}\n"
        )
        daemon.wait_for_log(
            rf"nothing accepts connections on {LOOPBACK}:{nothing} yet: start"
            " your application there, or give --forward"
        )
        advice = daemon.wait_for_log(r"no owner is registered.*").group(0)
    assert "`dwtrust keygen --identity ~/.dwtrust-owner --org acme" in advice
    assert f"`twistd dwtrust --identity {identity} --owner" in advice


def test_newIdentityNarrowedQuietly(tmp_path: Path) -> None:
    """
    A daemon that creates its identity makes the identity's files private
    without warning that files it has just written were readable by others:
    the warning is for files that were there before.
    """
    identity = tmp_path / "identity"
    with Daemon(tmp_path, "--identity", str(identity)) as daemon:
        daemon.wait_for_log(r"created the identity")
        daemon.wait_for_log(r"listening for dwtrust peers")
        log = daemon.log()
    assert "readable by other local users" not in log, log
    for name in ("identity.json", "id_dwtrust.pub"):
        assert (identity / name).stat().st_mode & 0o077 == 0, name


def test_quietWhenReady(tmp_path: Path) -> None:
    """
    With the application up and an owner given, neither warning is logged.
    """
    identity, owner = tmp_path / "identity", tmp_path / "owner"
    keygen(identity, "acme", "ledger")
    keygen(owner, "acme", "alice")
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path,
            "--identity",
            str(identity),
            "--forward",
            echo.forward,
            "--owner",
            str(owner / "id_dwtrust.pub"),
        ) as daemon,
    ):
        daemon.wait_for_log(r"listening for dwtrust peers on ")
        log = daemon.log()
        # The check of a loopback target does not connect to it.
        assert echo.connections() == 0
    assert "nothing accepts connections" not in log
    assert "no owner is registered" not in log


def test_listenerKnown(tmp_path: Path) -> None:
    """
    Whether something listens at a loopback or UNIX-socket target is known
    without connecting to it.
    """
    from twisted.internet import reactor

    with busyPort() as port, refusing_port() as nothing:
        assert _listenerKnown(
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={port}")
        )
        assert _listenerKnown(
            clientFromString(reactor, f"tcp:host=localhost:port={port}")
        )
        assert not _listenerKnown(
            clientFromString(reactor, f"tcp:host=127.0.0.1:port={nothing}")
        )
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(tmp_path / "app.sock"))
        unix.listen(1)
        assert _listenerKnown(clientFromString(reactor, f"unix:{tmp_path}/app.sock"))
    assert not _listenerKnown(clientFromString(reactor, f"unix:{tmp_path}/none"))
    # Elsewhere, only a connection can tell.
    assert (
        _listenerKnown(clientFromString(reactor, "tcp:host=192.0.2.1:port=80")) is None
    )


# Service accounts.


def test_unwritableHome(tmp_path: Path) -> None:
    """
    With the default identity under a HOME this user cannot write, the
    daemon ends with one line that names the directory, its owner, and
    says to give --identity; nothing is created.
    """
    needRoot()
    home = tmp_path / "home"
    home.mkdir()
    # Readable, not writable (whatever umask earlier tests left).
    os.chmod(home, 0o755)
    os.chown(home, NOBODY, NOBODY)
    done = run(
        twistd(
            "--pidfile",
            "",
            "dwtrust",
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            foreground=True,
        ),
        tmp_path,
        env={"HOME": str(home)},
        unprivileged=True,
    )
    line = oneLine(done)
    assert line.startswith(
        f"twistd dwtrust: cannot create the identity directory {home}/.dwtrust:"
        f" permission denied: {home} belongs to nobody (uid {NOBODY})"
    ), line
    assert "give --identity a path in a directory this user can write" in line
    assert f"HOME={home}" in line
    assert os.listdir(home) == []


def _othersIdentity(tmp_path: Path) -> Path:
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    for path in [identity, *identity.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    os.chmod(identity, 0o700)
    return identity


def test_othersIdentityDaemon(tmp_path: Path) -> None:
    """
    An identity directory of another user is refused before anything in it
    is read: one line naming its owner, nothing created there.
    """
    needRoot()
    identity = _othersIdentity(tmp_path)
    before = sorted(os.listdir(identity))
    done = run(
        twistd(
            "--pidfile",
            "",
            "dwtrust",
            "--identity",
            str(identity),
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            foreground=True,
        ),
        tmp_path,
        unprivileged=True,
    )
    line = oneLine(done)
    assert line.startswith(
        f"twistd dwtrust: the identity directory {identity} belongs to another"
        f" user (nobody, uid {NOBODY})"
    ), line
    assert "run it as the directory's owner" in line, line
    assert sorted(os.listdir(identity)) == before


def test_othersIdentityShow(tmp_path: Path) -> None:
    """
    C{dwtrust show} on an identity it cannot read says permission denied
    and whose it is, not that there is none to show.
    """
    needRoot()
    identity = _othersIdentity(tmp_path)
    done = run(
        [DWTRUST, "show", "--identity", str(identity)], tmp_path, unprivileged=True
    )
    line = oneLine(done)
    assert line == (
        f"dwtrust: cannot read the identity in {identity}: permission denied:"
        f" it belongs to nobody (uid {NOBODY}) with mode 0700, and this process"
        f" runs as {'root (uid 0)'}; run as nobody, or give --identity another"
        " path"
    ), line
    assert "create one" not in line


def test_unreadableIdentity(tmp_path: Path) -> None:
    """
    An identity directory of this user that it may not read (mode 0000) is
    never taken for an empty one: the daemon and C{dwtrust show} and
    C{dwtrust keygen} say permission denied and how to fix it, and nothing
    is created in it.
    """
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    before = sorted(os.listdir(identity))
    os.chmod(identity, 0)
    try:
        commands = {
            "daemon": twistd(
                "--pidfile",
                "",
                "dwtrust",
                "--identity",
                str(identity),
                "--listen",
                f"tcp:0:interface={LOOPBACK}",
                foreground=True,
            ),
            "show": [DWTRUST, "show", "--identity", str(identity)],
            "keygen": [
                DWTRUST,
                "keygen",
                "--identity",
                str(identity),
                "--org",
                "acme",
                "--service",
                "other",
            ],
        }
        for name, command in commands.items():
            done = run(command, tmp_path, unprivileged=True)
            line = oneLine(done)
            assert f"cannot read the identity in {identity}: permission denied:" in (
                line
            ), (name, line)
            assert "has mode 0000; make it readable and writable by its owner" in (
                line
            ), (name, line)
    finally:
        os.chmod(identity, 0o700)
    assert sorted(os.listdir(identity)) == before


def test_controlDirectoryReadOnly(tmp_path: Path) -> None:
    """
    An identity directory this user may read but not write (mode 0500)
    cannot hold the control socket: refused before twistd forks, in one line
    that says how to fix it.
    """
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    os.chmod(identity, 0o500)
    try:
        done = run(
            twistd(
                "--pidfile",
                str(tmp_path / "dwtrust.pid"),
                "--logfile",
                str(tmp_path / "dwtrust.log"),
                "dwtrust",
                "--identity",
                str(identity),
                "--listen",
                f"tcp:0:interface={LOOPBACK}",
                foreground=False,
            ),
            tmp_path,
            unprivileged=True,
        )
    finally:
        os.chmod(identity, 0o700)
    line = oneLine(done)
    assert line == (
        f"twistd dwtrust: cannot create the UNIX socket (--control)"
        f" {identity}/control.sock: permission denied: {identity} has mode"
        f" 0500; let its owner write there (chmod u+wx {identity}), or give"
        " --control a path in a directory this user can write"
    ), line
    assert not (tmp_path / "dwtrust.pid").exists()


def test_keygenUnwritable(tmp_path: Path) -> None:
    """
    C{dwtrust keygen} into a directory it cannot write says so in one line,
    with the directory, and creates nothing.
    """
    parent = tmp_path / "parent"
    parent.mkdir()
    os.chmod(parent, 0o555)
    try:
        done = run(
            [
                DWTRUST,
                "keygen",
                "--identity",
                str(parent / "new"),
                "--org",
                "acme",
                "--service",
                "ledger",
            ],
            tmp_path,
            unprivileged=True,
        )
        line = oneLine(done)
        assert line == (
            f"dwtrust: cannot create the identity directory {parent}/new:"
            f" permission denied: {parent} has mode 0555; let its owner write"
            f" there (chmod u+wx {parent}), or give --identity a path in a"
            " directory this user can write"
        ), line
        assert os.listdir(parent) == []
    finally:
        os.chmod(parent, 0o755)


def test_storeUnwritable(tmp_path: Path) -> None:
    """
    A trust store this user may not write is refused in one line that names
    it, whose it is, and says to give --store.
    """
    needRoot()
    identity = tmp_path / "identity"
    keygen(identity, "acme", "ledger")
    stores = tmp_path / "stores"
    stores.mkdir()
    store = stores / "trust.sqlite3"
    store.write_bytes(b"")
    os.chmod(store, 0o600)
    os.chown(store, NOBODY, NOBODY)
    done = run(
        twistd(
            "--pidfile",
            "",
            "dwtrust",
            "--identity",
            str(identity),
            "--store",
            str(store),
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            foreground=True,
        ),
        tmp_path,
        unprivileged=True,
    )
    line = oneLine(done)
    assert line == (
        f"twistd dwtrust: cannot open the trust store {store}: permission"
        f" denied: it belongs to nobody (uid {NOBODY}) with mode 0600, and this"
        " process runs as root (uid 0); run as nobody, or give --store another"
        " path"
    ), line


# The pieces.


def test_placeDaemonFiles() -> None:
    """
    twistd's default pid and log files move to the identity directory; ones
    given, and the log of a daemon in the foreground (standard output), do
    not.
    """
    server = {"pidfile": "twistd.pid", "logfile": None, "nodaemon": False}
    placeDaemonFiles(server, "relative/id")
    here = os.path.abspath("relative/id")
    assert server["pidfile"] == os.path.join(here, "twistd.pid")
    assert server["logfile"] == os.path.join(here, "twistd.log")
    given = {"pidfile": "./twistd.pid", "logfile": "x.log", "nodaemon": False}
    placeDaemonFiles(given, "/srv/id")
    assert given == {"pidfile": "./twistd.pid", "logfile": "x.log", "nodaemon": False}
    foreground = {"pidfile": "", "logfile": None, "nodaemon": True}
    placeDaemonFiles(foreground, "/srv/id")
    assert foreground == {"pidfile": "", "logfile": None, "nodaemon": True}


def test_describeTarget() -> None:
    assert describeTarget("tcp:host=127.0.0.1:port=8080") == "127.0.0.1:8080"
    assert describeTarget("unix:/run/app.sock") == "unix:/run/app.sock"
