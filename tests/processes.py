"""
Real processes for the end-to-end tests: the C{twistd dwtrust} daemon, the
C{dwtrust} command, a recording echo server, and the waiting that goes with
them.

Everything listens on and connects to 127.0.0.1 only.  Nothing here sleeps to
make a point: readiness is polled for, with a bounded deadline, and a time-out
fails with a message that says what never happened.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

from attrs import frozen

LOOPBACK = "127.0.0.1"
#: Seconds allowed for a process to become ready, or to stop.
DEADLINE = 15.0
#: Seconds allowed for one run of a command.
COMMAND_TIMEOUT = 60.0

#: The executables of this project's virtualenv, whatever PATH says.
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
DWTRUST = os.path.join(BIN, "dwtrust")

#: The private key file of an identity directory.
PRIVATE_KEY = "id_dwtrust"
#: The trust store file of an identity directory.
STORE = "trust.sqlite3"

T = TypeVar("T")


def wait_for(
    check: Callable[[], T | None],
    what: str,
    deadline: float = DEADLINE,
    interval: float = 0.02,
    why: Callable[[], str] = lambda: "",
) -> T:
    """
    Call C{check} until it returns something other than L{None} (or
    L{False}), and return that.

    @param what: what is being waited for, for the failure message.
    @param why: more to say if time runs out (a log, say).
    @raise AssertionError: if C{deadline} seconds pass first.
    """
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > end:
            raise AssertionError(
                f"timed out after {deadline:g} s waiting for {what}\n{why()}"
            )
        time.sleep(interval)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    Racy: the port is closed before the caller uses it, so another process
    may take it in between.  Do not use it for something that must listen
    (start the listener on port 0 and read back the port it bound, as
    L{Daemon} and L{EchoServer} do); at most use it for a port that nothing
    should answer on, and prefer L{refusing_port} for that.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def refusing_port() -> Iterator[int]:
    """
    A TCP port on 127.0.0.1 where connections are refused, held for the
    block: it is bound (so no other process can take it) and not listening.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        yield port


def accepts(port: int) -> bool:
    """
    Whether something on 127.0.0.1:C{port} accepts a TCP connection.
    """
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def run_cli(
    *args: str, input: bytes = b"", timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{dwtrust ARGS...} with C{input} on its standard input; return what it
    did (standard error is bytes, like standard output).
    """
    return subprocess.run(
        [DWTRUST, *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def start_cli(*args: str, input: bytes = b"") -> subprocess.Popen[bytes]:
    """
    Start C{dwtrust ARGS...}, give it all of C{input} and the end of its
    standard input, and return at once; wait for it with L{finish}.
    """
    process = subprocess.Popen(
        [DWTRUST, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    # Small enough for the pipe's buffer: this does not wait for the reader.
    process.stdin.write(input)
    process.stdin.close()
    process.stdin = None  # so that communicate() does not flush it
    return process


def start_session(*args: str) -> subprocess.Popen[bytes]:
    """
    Start C{dwtrust ARGS...} with its standard input left open, for a session
    that lasts until the test writes to it or closes it; wait for it with
    L{finish}.
    """
    return subprocess.Popen(
        [DWTRUST, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


class Lines:
    """
    The lines a running process writes to one of its pipes, collected by a
    thread as they come, so that a test can wait for one without blocking
    on the pipe.
    """

    def __init__(self, pipe: IO[bytes] | None) -> None:
        assert pipe is not None, "the pipe was not opened"
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            with self._lock:
                self._lines.append(line.decode(errors="replace"))

    def lines(self) -> list[str]:
        """
        The lines read so far.
        """
        with self._lock:
            return list(self._lines)

    def text(self) -> str:
        return "".join(self.lines())

    def wait_for(self, pattern: str, deadline: float = DEADLINE) -> re.Match[str]:
        """
        Wait until a line matches the regular expression C{pattern}; return
        the match.
        """
        compiled = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in self.lines():
                match = compiled.search(line)
                if match:
                    return match
            return None

        return wait_for(
            found,
            f"a line matching {pattern!r}",
            deadline,
            why=lambda: "read so far:\n" + self.text(),
        )

    def join(self, timeout: float = DEADLINE) -> None:
        """
        Wait for the end of the pipe.
        """
        self._thread.join(timeout)


def finish(process: subprocess.Popen[bytes]) -> subprocess.CompletedProcess[bytes]:
    """
    Wait for a process started with L{start_cli}; return what it did.
    """
    try:
        out, err = process.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(
            f"{process.args!r} did not finish in {COMMAND_TIMEOUT:g} s;"
            f" output {out!r}, errors {err!r}"
        ) from None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def keygen(directory: Path, org: str, service: str, algorithm: str = "ed25519") -> str:
    """
    Make an identity with C{dwtrust keygen}; return its fingerprint.
    """
    done = run_cli(
        "keygen",
        "--identity",
        str(directory),
        "--org",
        org,
        "--service",
        service,
        "--algorithm",
        algorithm,
    )
    assert done.returncode == 0, describe(done)
    return fingerprint_in(done.stdout.decode())


def fingerprint_in(text: str) -> str:
    """
    The one C{SHA256:...} fingerprint in C{text}.
    """
    found: set[str] = set(re.findall(r"SHA256:[A-Za-z0-9+/]{43}", text))
    assert len(found) == 1, f"expected one fingerprint in {text!r}, found {found}"
    return found.pop()


def describe(done: subprocess.CompletedProcess[bytes]) -> str:
    """
    A command's status, output and errors, for failure messages.
    """
    return (
        f"{done.args!r} exited {done.returncode}\n"
        f"stdout: {done.stdout!r}\nstderr: {done.stderr.decode(errors='replace')}"
    )


# The echo server: one thread per connection, and a line in a log file for
# every accepted connection, every chunk received (with its size) and every
# close, flushed as it happens.
_ECHO = r"""
import os, socket, sys, threading

log = open(sys.argv[1], "a", buffering=1)
lock = threading.Lock()

def note(line):
    with lock:
        log.write(line + "\n")
        log.flush()

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
ready = sys.argv[2]
with open(ready + ".tmp", "w") as f:
    f.write(str(server.getsockname()[1]))
os.replace(ready + ".tmp", ready)

def serve(connection, number):
    with connection:
        while True:
            data = connection.recv(65536)
            if not data:
                break
            note(f"data {number} {len(data)}")
            connection.sendall(data)
    note(f"close {number}")

number = 0
while True:
    connection, _ = server.accept()
    number += 1
    note(f"accept {number}")
    threading.Thread(target=serve, args=(connection, number), daemon=True).start()
"""


class EchoServer:
    """
    A local application for the daemon to forward to: it echoes every byte,
    and records every connection and the size of everything it received.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "echo.log"
        self._ready = directory / "echo.port"
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> EchoServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        process = self._process = subprocess.Popen(
            [sys.executable, "-c", _ECHO, str(self.log), str(self._ready)],
            stdin=subprocess.DEVNULL,
        )

        def port() -> int | None:
            if process.poll() is not None:
                raise AssertionError(f"the echo server exited {process.returncode}")
            if self._ready.exists():
                return int(self._ready.read_text())
            return None

        self.port = wait_for(port, "the echo server to listen")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._process is not None
        self._process.kill()
        self._process.wait(timeout=DEADLINE)

    @property
    def forward(self) -> str:
        """
        The client endpoint description of this server, for C{--forward}.
        """
        return f"tcp:host={LOOPBACK}:port={self.port}"

    def _lines(self, kind: str) -> list[list[str]]:
        return [
            line.split()
            for line in self.log.read_text().splitlines()
            if line.startswith(kind + " ")
        ]

    def connections(self) -> int:
        """
        How many connections it has accepted.
        """
        return len(self._lines("accept"))

    def received(self) -> dict[int, int]:
        """
        The bytes received on each connection that received any, by number.
        """
        sizes: dict[int, int] = {}
        for _, number, size in self._lines("data"):
            sizes[int(number)] = sizes.get(int(number), 0) + int(size)
        return sizes

    def closed(self) -> int:
        """
        How many of its connections have closed.
        """
        return len(self._lines("close"))


class Daemon:
    """
    C{twistd -n dwtrust --listen tcp:PORT:interface=127.0.0.1 OPTIONS...},
    run in C{directory} with its own log and pid files.

    PORT is 0 unless C{port} is given (to start again on the port of an
    earlier daemon): the daemon takes a port of its own, and entering reads
    back the port it bound from its log (L{bound_ports}), so no other
    process can take it in between.  C{port} and C{address} are known once
    the daemon is entered.

    Entering starts it and waits (up to L{DEADLINE} seconds) until it has
    logged that it listens and its port accepts a TCP connection.  Leaving
    sends it SIGTERM and waits for it to exit; if the block failed, the
    daemon's log is printed, so pytest shows it with the failure.  A daemon
    that died before it was told to stop is a failure of its own.

    With C{listen=False} there is no C{--listen} (a pure client sidecar, given
    C{--connect}): entering waits for its start-up line instead.

    C{env} adds to (or overrides) the environment the daemon inherits.
    """

    _started = 0

    def __init__(
        self,
        directory: Path,
        *options: str,
        port: int | None = None,
        listen: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        Daemon._started += 1
        self.listen = listen
        self.directory = directory
        self.options = options
        #: The port asked for: 0 for any.
        self._asked = 0 if port is None else port
        #: The port it listens on, once entered.
        self.port = self._asked
        self.env = dict(env or {})
        name = f"daemon-{Daemon._started}"
        self.logfile = directory / f"{name}.log"
        self.pidfile = directory / f"{name}.pid"
        self.output = directory / f"{name}.out"
        self._process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._killed = False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def log(self) -> str:
        """
        Everything the daemon has logged so far.
        """
        return self.logfile.read_text() if self.logfile.exists() else ""

    def report(self) -> str:
        """
        The daemon's command line, log and output, for failure messages.
        """
        output = self.output.read_text() if self.output.exists() else ""
        return (
            f"--- daemon {' '.join(self.command())} (exit {self.returncode})\n"
            f"--- log {self.logfile}:\n{self.log()}\n--- output:\n{output}"
        )

    def command(self) -> list[str]:
        return [
            TWISTD,
            "-n",
            "--logfile",
            str(self.logfile),
            "--pidfile",
            str(self.pidfile),
            "dwtrust",
            *(
                ["--listen", f"tcp:{self._asked}:interface={LOOPBACK}"]
                if self.listen
                else []
            ),
            *self.options,
        ]

    def bound_ports(self) -> list[tuple[str, int]]:
        """
        The TCP ports the daemon has bound so far, in the order it bound
        them, each with the log prefix of its factory: from the lines
        Twisted logs as a port starts listening (C{"PREFIX starting on
        PORT"}).
        """
        return [
            (prefix, int(port))
            for prefix, port in re.findall(
                r"^\S+ \[[^]]*\] (.+) starting on (\d+)$", self.log(), re.M
            )
        ]

    def port_of(self, prefix: str, number: int = 0) -> int:
        """
        The port that the C{number}th (from 0) factory whose log prefix starts
        with C{prefix} bound (the daemon starts its listening port, then its
        sidecars' local ports, then its control port), once it is bound:
        for a port asked for as port 0.
        """

        def bound() -> int | None:
            ports = [p for name, p in self.bound_ports() if name.startswith(prefix)]
            return ports[number] if len(ports) > number else None

        return wait_for(bound, f"a {prefix} port to be bound", why=self.report)

    def _listening_port(self) -> int:
        """
        The port of C{--listen}: the port asked for, if one was; otherwise the
        first port bound that the options do not name.  (The daemon starts
        its listening port before its sidecars' local ports and its control
        port.)
        """
        bound = [port for _, port in self.bound_ports()]
        if self._asked:
            candidates = [self._asked] if self._asked in bound else []
        else:
            named = {int(n) for n in re.findall(r"\btcp:(\d+)", " ".join(self.options))}
            candidates = [port for port in bound if port not in named]
        if not candidates:
            raise AssertionError(
                f"the daemon logged no port it listens on\n{self.report()}"
            )
        return candidates[0]

    def wait_for_log(self, pattern: str) -> re.Match[str]:
        """
        Wait until a line of the log matches the regular expression
        C{pattern}; return the match.
        """
        compiled = re.compile(pattern)

        def logged() -> re.Match[str] | None:
            self._check_alive()
            return compiled.search(self.log())

        return wait_for(logged, f"the daemon to log {pattern!r}", why=self.report)

    def _check_alive(self) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            self.returncode = self._process.returncode
            raise AssertionError(f"the daemon exited early\n{self.report()}")

    def __enter__(self) -> Daemon:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.output.open("wb") as output:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env={**os.environ, **self.env} if self.env else None,
            )
        try:
            if not self.listen:
                self.wait_for_log(r"dwtrust: .* client sidecar ")
                return self
            self.wait_for_log(r"listening on tcp:")
            self.port = self._listening_port()

            def listening() -> bool:
                self._check_alive()
                return accepts(self.port)

            wait_for(
                listening,
                f"the daemon's port {self.port} to accept connections",
                why=self.report,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int:
        """
        Send SIGTERM and wait for the daemon to exit; return its status.
        """
        process = self._process
        assert process is not None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                self.returncode = process.returncode
                raise AssertionError(
                    f"the daemon ignored SIGTERM for {DEADLINE:g} s\n{self.report()}"
                ) from None
        self.returncode = process.returncode
        return process.returncode

    def kill(self) -> int:
        """
        Send SIGKILL, as a crash would, and wait for the daemon to die; return
        its status.  Leaving the block afterwards is no failure.
        """
        process = self._process
        assert process is not None
        self._killed = True
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=DEADLINE)
        self.returncode = process.returncode
        return process.returncode

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._process is not None
        died_early = self._process.poll() is not None and not self._killed
        self.stop()
        if kind is not None:
            print(self.report())
        elif died_early:
            raise AssertionError(f"the daemon died during the test\n{self.report()}")


def run_twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """
    Run C{twistd ARGS...} to completion (for invocations that should fail).
    """
    return subprocess.run(
        [TWISTD, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        cwd=cwd,
        check=False,
    )


@frozen
class Connected:
    """
    What one C{echo ... | dwtrust connect} did.
    """

    status: int
    stdout: bytes
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.status}\nstdout: {self.stdout!r}\nstderr: {self.stderr}"


def connect(
    identity: Path, address: str, *options: str, input: bytes = b"hello\n"
) -> Connected:
    """
    C{dwtrust connect --identity IDENTITY OPTIONS... ADDRESS} with C{input}.
    """
    done = run_cli(
        "connect", "--identity", str(identity), *options, address, input=input
    )
    return Connected(done.returncode, done.stdout, done.stderr.decode(errors="replace"))
