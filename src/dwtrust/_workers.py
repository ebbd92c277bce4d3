"""
C{twistd dwtrust --workers N}: one daemon in N processes.

The main process (the one C{twistd} runs) opens the listening sockets, the
control socket, the status endpoint and the identity's lock as a daemon of
one process does, and serves connections itself.  Once it is running it
starts N-1 worker processes (the same Python, L{workerMain}), each handed
the listening sockets (C{--listen}, and the local ones of C{--connect}) as
inherited file descriptors, and its options on a pipe (standard input),
never in its arguments.  Every process accepts on the same sockets, and the
kernel hands each new connection to one of them.

Each worker is an instance of the service on the shared trust store, as the
instances of a fleet are (see C{docs/fleet.rst}): a decision made through
the main process's control channel reaches the workers through the store
(L{dwtrust.store.IStoreEvents}; a SQLite store is watched for the other
processes' commits), so that approvals release the connections a worker
holds and revocations close its sessions, and a request raised in a worker
reaches the owners through the main process.  A worker has no control
socket, status endpoint or provisioning.

A worker's log events travel to the main process on its standard output,
one JSON object a line, and are logged there (and written to the audit log)
with C{worker} (its number, from 1) and C{worker_pid} fields: owners and
operators see one daemon.  A worker ends when its standard input reaches
its end, which is when the main process ends, however it ends; the main
process starts a worker that dies again, and passes C{SIGHUP} on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import (
    ConnectionDone,
    ProcessExitedAlready,
    ReactorNotRunning,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorCore,
    IReactorFDSet,
    IReactorProcess,
    IReactorSocket,
    IReactorTime,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

log = Logger()

#: The file descriptor a worker gets its first listening socket on.
FIRST_FD = 3
#: Seconds a worker is given to stop before it is killed.
STOP_TIMEOUT = 10.0
#: Seconds before a worker that died is started again, at first; it doubles
#: for a worker that dies again soon after it started, up to L{MAX_RESTART}.
RESTART_DELAY = 1.0
MAX_RESTART = 60.0
#: A worker that ran this many seconds is started again after
#: L{RESTART_DELAY}, whatever happened before.
STEADY = 30.0
#: The longest log line accepted from a worker.
MAX_LINE = 1 << 20
#: The environment variables a worker does not inherit: systemd's, which
#: are the main process's alone (only it may say READY=1).
_PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class WorkersError(ValueError):
    """
    A C{--workers} value that is not a count of processes.
    """


def workerCount(value: str) -> int:
    """
    The number of processes C{--workers} asks for: a positive integer, or
    C{auto} for one per core.

    @raise WorkersError: for anything else.
    """
    if value.strip() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        count = int(value)
    except ValueError:
        raise WorkersError(f"a number of processes or auto, not {value!r}") from None
    if count < 1:
        raise WorkersError(f"at least 1 process, not {count}")
    return count


@frozen
class Adopted:
    """
    The listening sockets a worker was handed: C{--listen}'s (if any), and
    each C{--connect} local endpoint's, in the order of the options.
    """

    index: int
    listen: int | None
    connect: tuple[int, ...]

    def endpoint(self, reactor: IReactorSocket, fd: int) -> IStreamServerEndpoint:
        """
        An endpoint that listens on the inherited socket C{fd}.
        """
        probe = socket.socket(fileno=fd)
        try:
            family = probe.family
        finally:
            probe.detach()
        endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
            reactor, fd, family
        )
        return endpoint


def _portOf(service: StreamServerEndpointService) -> Deferred[IListeningPort]:
    waiting = getattr(service, "_waitingForPort", None)
    if not isinstance(waiting, Deferred):
        raise RuntimeError("a listening port was not started")
    found: Deferred[IListeningPort] = Deferred()

    def got(port: IListeningPort) -> IListeningPort:
        found.callback(port)
        return port

    waiting.addCallback(got)
    return found


class WorkerPool(Service):
    """
    The main process's workers: started by L{begin} (once the daemon runs),
    started again when one dies, signalled on C{SIGHUP}, and stopped with
    the daemon.

    @ivar count: how many processes serve in all, this one included.
    """

    def __init__(
        self,
        count: int,
        arguments: list[str],
        webhookAuthorization: str | None,
        listen: StreamServerEndpointService | None,
        connect: list[StreamServerEndpointService],
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self.count = count
        self._arguments = arguments
        self._secret = webhookAuthorization
        self._listen = listen
        self._connect = connect
        self._reactor = reactor
        self._fds: list[int] = []
        self._hasListen = listen is not None
        #: The running workers, by number.
        self.workers: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False

    def pids(self) -> list[int]:
        """
        The process ids of the workers running now, by number.
        """
        return [w.pid for _, w in sorted(self.workers.items()) if w.pid is not None]

    def begin(self) -> Deferred[None]:
        """
        Start every worker (once the listening sockets are bound).
        """
        services = ([self._listen] if self._listen is not None else []) + list(
            self._connect
        )
        ports = gatherResults([_portOf(s) for s in services])

        def spawn(found: list[IListeningPort]) -> None:
            self._fds = [port.fileno() for port in found]  # type: ignore[attr-defined]
            if self._stopping:
                return
            for index in range(1, self.count):
                self._spawn(index)
            log.info(
                "dwtrust: {count} worker process(es) started, pids {pids}",
                event="dwtrust.workers.started",
                count=self.count - 1,
                pids=self.pids(),
            )

        return ports.addCallback(spawn).addErrback(
            lambda f: log.failure("dwtrust: the workers could not start", f)
        )

    def _config(self, index: int) -> bytes:
        fds = list(range(FIRST_FD, FIRST_FD + len(self._fds)))
        config = {
            "index": index,
            "arguments": self._arguments,
            "webhookAuthorization": self._secret,
            "listen": fds[0] if self._hasListen else None,
            "connect": fds[1:] if self._hasListen else fds,
        }
        return json.dumps(config).encode() + b"\n"

    def _spawn(self, index: int) -> None:
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for offset, fd in enumerate(self._fds):
            childFDs[FIRST_FD + offset] = fd
        environment = {
            k: v for k, v in os.environ.items() if k not in _PRIVATE_ENVIRONMENT
        }
        worker = _Worker(self, index, self._config(index), self._reactor.seconds())
        IReactorProcess(self._reactor).spawnProcess(
            worker,
            sys.executable,
            [
                sys.executable,
                "-c",
                "from dwtrust._workers import workerMain; workerMain()",
            ],
            env=environment,
            childFDs=childFDs,
        )
        self.workers[index] = worker

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        ran = self._reactor.seconds() - worker.started
        delay = (
            RESTART_DELAY
            if ran >= STEADY
            else min(self._delays.get(worker.index, RESTART_DELAY / 2) * 2, MAX_RESTART)
        )
        self._delays[worker.index] = delay
        log.warn(
            "dwtrust: worker {worker} (pid {worker_pid}) ended: {reason}; starting"
            " it again in {delay} s",
            event="dwtrust.worker.ended",
            worker=worker.index,
            worker_pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[worker.index] = IReactorTime(self._reactor).callLater(
            delay, self._restart, worker.index
        )

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self._stopping:
            self._spawn(index)

    def reload(self) -> None:
        """
        Pass C{SIGHUP} on to every worker: each reads its owners and
        C{--allow} entries again, as the main process does.
        """
        for worker in self.workers.values():
            worker.signal("HUP")

    def stopService(self) -> Deferred[None]:
        """
        Stop every worker: close its lifeline; send C{SIGTERM} to one that
        has not ended within half of L{STOP_TIMEOUT} seconds, and kill one
        that has not ended within L{STOP_TIMEOUT}.
        """
        Service.stopService(self)
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        return gatherResults(
            [w.stop(self._reactor) for w in list(self.workers.values())]
        ).addCallback(lambda _: None)


class _Worker(ProcessProtocol):
    """
    One worker, as the main process sees it: its options go down its
    standard input (kept open as its lifeline), its log events come up its
    standard output.
    """

    def __init__(self, pool: WorkerPool, index: int, config: bytes, started: float):
        self.pool = pool
        self.index = index
        self.config = config
        self.started = started
        self.pid: int | None = None
        self._lines = b""
        self._errors = b""
        self._ended: list[Deferred[None]] = []
        self.done = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self.config)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._lines = self._each(self._lines + data, self._event)
        elif childFD == 2:
            self._errors = self._each(self._errors + data, self._error)

    @staticmethod
    def _each(buffered: bytes, handle: Callable[[bytes], None]) -> bytes:
        *lines, rest = buffered.split(b"\n")
        for line in lines:
            handle(line)
        return rest if len(rest) <= MAX_LINE else b""

    def _event(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8"))
            if not isinstance(event, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warn(
                "dwtrust: worker {worker} wrote a line that is not a log event",
                worker=self.index,
            )
            return
        event["log_system"] = f"worker {self.index}"
        event["worker"] = self.index
        event["worker_pid"] = self.pid
        if not isinstance(event.get("log_level"), type(LogLevel.info)):
            event["log_level"] = LogLevel.info
        globalLogPublisher(event)

    def _error(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            log.warn(
                "dwtrust: worker {worker}: {line}",
                worker=self.index,
                worker_pid=self.pid,
                line=text,
            )

    def signal(self, name: str) -> None:
        if self.transport is not None and not self.done:
            with contextlib.suppress(ProcessExitedAlready, OSError):
                self.transport.signalProcess(name)

    def stop(self, reactor: Any) -> Deferred[None]:
        if self.done:
            return succeed(None)
        ended: Deferred[None] = Deferred()
        self._ended.append(ended)
        assert self.transport is not None
        # The end of its lifeline stops it; SIGTERM and SIGKILL are for one
        # that does not notice.
        self.transport.closeStdin()
        clock = IReactorTime(reactor)
        calls = [
            clock.callLater(STOP_TIMEOUT / 2, self.signal, "TERM"),
            clock.callLater(STOP_TIMEOUT, self.signal, "KILL"),
        ]

        def cancel(result: object) -> object:
            for call in calls:
                if call.active():
                    call.cancel()
            return result

        return ended.addBoth(cancel)

    def processEnded(self, reason: Failure) -> None:
        self.done = True
        for line in (self._lines, self._errors):
            if line:
                self._error(line)
        self._lines = self._errors = b""
        ended, self._ended = self._ended, []
        self.pool._ended(self, reason)
        for waiting in ended:
            waiting.callback(None)


def reloadWorkers(daemon: Any) -> None:
    """
    Pass C{SIGHUP} on to the workers of C{daemon}, if it has any.
    """
    for child in daemon:
        if isinstance(child, WorkerPool):
            child.reload()


# The worker's side.


def ownNewest(directory: FilePath[str], name: str, index: int) -> FilePath[str]:
    """
    Worker C{index}'s own memory of the newest decisions (see
    L{dwtrust.store.NewestDecisions}), beside the main process's C{name}:
    each process is an instance that must see a decision as news to act on
    it (wake the connections it holds, close sessions).  The first time,
    it starts as a copy of the main process's memory, so that a new worker
    knows every decision the daemon has seen.  Blocks: before the reactor
    runs.
    """
    stem, dot, suffix = name.rpartition(".")
    own = directory.child(f"{stem}-worker-{index}{dot}{suffix}")
    main = directory.child(name)
    if own.exists() or not main.exists():
        return own
    copy = own.sibling(own.basename() + ".new")
    try:
        source = sqlite3.connect(main.path, timeout=5.0)
        fd = os.open(copy.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
        target = sqlite3.connect(copy.path)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
        os.replace(copy.path, own.path)
    except (OSError, sqlite3.Error) as e:
        log.warn(
            "dwtrust: worker {worker} could not copy {main}: {error}; it starts"
            " with an empty memory of decisions",
            worker=index,
            main=main.path,
            error=str(e),
        )
    return own


#: Event keys that hold live objects, not facts, and are not forwarded.
_LIVE_KEYS = ("log_logger", "log_source", "log_observer", "log_trace")


def _forwardable(event: dict[str, Any]) -> str:
    """
    One log event as one line of JSON for the main process: its level and
    failure kept as Twisted's JSON log format keeps them, anything else
    that is not JSON as its C{str}, as the audit log writes it.
    """
    facts: dict[str, Any] = {}
    for key, value in event.items():
        if key in _LIVE_KEYS or not isinstance(key, str):
            continue
        if not isinstance(value, (Failure, type(LogLevel.info))):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = str(value)
        facts[key] = value
    return eventAsJSON(facts)


@implementer(ILogObserver)
class _Forward:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __call__(self, event: dict[str, Any]) -> None:
        line = (_forwardable(event) + "\n").encode("utf-8", "replace")
        try:
            while line:
                written = os.write(self._fd, line)
                line = line[written:]
        except OSError:
            pass  # the main process is gone: the lifeline ends this one


@implementer(IReadDescriptor)
class _Lifeline:
    """
    Standard input, which the main process keeps open while it runs: its
    end stops this worker.
    """

    def __init__(self, reactor: IReactorCore) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "lifeline"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return ConnectionDone()
        return None

    def connectionLost(self, reason: Failure) -> None:
        with contextlib.suppress(ReactorNotRunning):
            self._reactor.stop()


def _readConfig() -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit("dwtrust worker: no configuration on standard input")
        data += chunk
    config: dict[str, Any] = json.loads(data)
    os.set_blocking(0, False)
    return config


def workerMain() -> None:
    """
    A worker process: read its configuration from standard input, build
    the daemon's serving part on the inherited sockets, and run until
    standard input ends or C{SIGTERM}.
    """
    config = _readConfig()
    # Standard output carries log events only.
    out = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    globalLogBeginner.beginLoggingTo([_Forward(out)], redirectStandardIO=False)

    from twisted.internet import reactor
    from twisted.python import usage

    from . import tap

    index = int(config["index"])
    options = tap.Options()
    options.worker = True
    options.webhookAuthorization = config["webhookAuthorization"]
    try:
        options.parseOptions(config["arguments"])
    except usage.UsageError as e:
        raise SystemExit(f"dwtrust worker {index}: {e}") from None
    options["audit-log"] = None
    options["status"] = None
    adopted = Adopted(index, config["listen"], tuple(config["connect"]))
    service: IService = tap.makeWorkerService(options, adopted)
    service.privilegedStartService()
    service.startService()
    core = IReactorCore(reactor)
    core.addSystemEventTrigger("before", "shutdown", service.stopService)
    IReactorFDSet(reactor).addReader(_Lifeline(core))
    log.info(
        "dwtrust: worker {worker} (pid {pid}) serving",
        event="dwtrust.worker.serving",
        worker=index,
        pid=os.getpid(),
    )
    core.run()


__all__ = [
    "Adopted",
    "WorkerPool",
    "WorkersError",
    "reloadWorkers",
    "workerCount",
    "workerMain",
]
