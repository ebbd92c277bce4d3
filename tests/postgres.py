"""
A real, throwaway PostgreSQL server for the tests: C{initdb} in a temporary
directory, C{pg_ctl} to start it on a free port on 127.0.0.1 (and a UNIX
socket in that directory), and a fresh database for each test.

The server runs as an unprivileged user (C{nobody}) when the tests run as
root, since PostgreSQL refuses to run as root.  A missing C{initdb} is a
failure that says what to install, never a skip: the fleet's tests must run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .processes import LOOPBACK, free_port

#: The superuser of the test servers.
USER = "dwtrust"
#: Seconds allowed for initdb, and for the server to start or stop.
SERVER_DEADLINE = 60


def _tool(name: str) -> str:
    """
    The path of a PostgreSQL server program: on PATH, or in Debian's
    C{/usr/lib/postgresql/VERSION/bin} (the newest).
    """
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    pytest.fail(
        f"{name} was not found (on PATH or in /usr/lib/postgresql/*/bin): the"
        " fleet tests need a PostgreSQL server; install Debian's postgresql"
        " package (./run-tests does)",
        pytrace=False,
    )


def _unprivileged() -> tuple[int, int] | None:
    """
    The uid and gid to run the server as: C{nobody}'s when we are root,
    L{None} (ourselves) otherwise.
    """
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


class PostgreSQLServer:
    """
    One throwaway server.  L{start} and L{stop} may be called again (on the
    same port) to simulate an outage.

    @ivar port: the TCP port it listens on, on 127.0.0.1.
    """

    _databases = itertools.count(1)

    def __init__(self) -> None:
        self.initdb = _tool("initdb")
        self.pg_ctl = _tool("pg_ctl")
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="dwtrust-pg-"))
        # The server's user must reach its directories.
        os.chmod(self.base, 0o755)
        self.data = self.base / "data"
        self.sockets = self.base / "sockets"
        self.logfile = self.base / "server.log"
        self._as = _unprivileged()
        self.running = False
        #: Whether it ever started (and so has a port its clients know).
        self.started = False

    def _run(self, *command: str) -> subprocess.CompletedProcess[bytes]:
        credentials = self._as

        def become() -> None:
            if credentials is not None:
                os.setgroups([])
                os.setgid(credentials[1])
                os.setuid(credentials[0])

        return subprocess.run(
            list(command),
            capture_output=True,
            timeout=SERVER_DEADLINE,
            check=False,
            preexec_fn=become,
            cwd=self.base,
            env={**os.environ, "LC_ALL": "C"},
        )

    def _check(self, done: subprocess.CompletedProcess[bytes], what: str) -> None:
        if done.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise AssertionError(
                f"{what} failed ({done.returncode}):\n{done.stdout.decode()}\n"
                f"{done.stderr.decode()}\n--- server log:\n{log}"
            )

    def create(self) -> None:
        """
        Make the data directory with C{initdb}.
        """
        for directory in (self.data, self.sockets):
            directory.mkdir(mode=0o700)
        self.logfile.touch()
        if self._as is not None:
            for path in (self.data, self.sockets, self.logfile):
                os.chown(path, *self._as)
        self._check(
            self._run(
                self.initdb,
                "-D",
                str(self.data),
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ),
            "initdb",
        )

    def start(self) -> None:
        """
        Start the server (again), and wait until it accepts connections.

        PostgreSQL cannot listen on port 0 and say which port it got, so its
        port is one that was free a moment before; should another process
        take it in between, the first start tries another (a restart keeps
        its port: its clients know it).
        """
        for attempt in range(5):
            try:
                self._start()
                return
            except AssertionError:
                if self.started or attempt == 4 or not self._portTaken():
                    raise
                self.port = free_port()

    def _portTaken(self) -> bool:
        try:
            return "could not bind" in self.logfile.read_text(errors="replace")
        except OSError:
            return False

    def _start(self) -> None:
        options = " ".join(
            [
                f"-c listen_addresses={LOOPBACK}",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.sockets}",
                "-c fsync=off",
                "-c full_page_writes=off",
                "-c max_connections=100",
            ]
        )
        self._check(
            self._run(
                self.pg_ctl,
                "start",
                "-w",
                "-t",
                str(SERVER_DEADLINE),
                "-D",
                str(self.data),
                "-l",
                str(self.logfile),
                "-o",
                options,
            ),
            "pg_ctl start",
        )
        self.running = True
        self.started = True

    def stop(self) -> None:
        """
        Stop the server at once (C{pg_ctl stop -m fast}: open connections are
        cut, as in an outage), and wait until it has stopped.
        """
        self._check(
            self._run(self.pg_ctl, "stop", "-w", "-m", "fast", "-D", str(self.data)),
            "pg_ctl stop",
        )
        self.running = False

    def destroy(self) -> None:
        """
        Stop the server if it runs, and remove its files.
        """
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@{LOOPBACK}:{self.port}/{database}"

    def newDatabase(self) -> str:
        """
        Create a new, empty database; return its URL.
        """
        import psycopg

        name = f"test_{os.getpid()}_{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def sql(
        self, url: str, statement: str, *parameters: object
    ) -> list[tuple[object, ...]]:
        """
        Run one statement on the database at C{url}, behind any store's
        back; return its rows (if it has any).
        """
        import psycopg

        with psycopg.connect(url, autocommit=True) as connection:
            cursor = connection.execute(statement, parameters or None)
            return list(cursor.fetchall()) if cursor.description else []


def started() -> PostgreSQLServer:
    """
    A new server, created and started; L{PostgreSQLServer.destroy} it.
    """
    server = PostgreSQLServer()
    try:
        server.create()
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQLServer]:
    """
    One server for the whole session (a test that stops it must start it
    again before it ends).
    """
    server = started()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def database(postgres: PostgreSQLServer) -> str:
    """
    The URL of a fresh database on the session's server.
    """
    return postgres.newDatabase()


@pytest.fixture
def ownServer() -> Iterator[PostgreSQLServer]:
    """
    A server for one test alone, which it may stop and start at will.
    """
    server = started()
    try:
        yield server
    finally:
        server.destroy()


SQL = Callable[..., list[tuple[object, ...]]]
