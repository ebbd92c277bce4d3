"""
Starting C{twistd dwtrust}: what can be checked before twistd forks, and how
a start-up that fails after it ends the daemon.

twistd builds the service (L{dwtrust.tap.makeService}) in the process the
user started; in daemon mode it then forks, and the child reports success or
failure to the waiting parent through a pipe.  A refusal before the fork is
one line on standard error and exit status 1, with nothing forked and no
pidfile written, so everything that can be known then is checked then: a
second daemon for one identity, a port another program listens on.  After
the fork a failure must be an L{Exception} for twistd to tell the parent and
remove the pidfile (a L{SystemExit} leaves the parent waiting forever); in
the foreground the pidfile twistd wrote is removed here.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat as statModule
import struct
import sys
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from ._identity import permissionAdvice

log = Logger()

#: twistd's own defaults, relative to the directory it is started in.
TWISTD_PIDFILE = "twistd.pid"
TWISTD_LOGFILE = "twistd.log"

#: Seconds a forwarding target has to accept the start-up probe.
PROBE_TIMEOUT = 5.0


class StartupError(Exception):
    """
    The daemon cannot start; the message says why, in one line.  Raised
    after twistd has forked, so that twistd tells the waiting parent, which
    exits 1, and removes the pidfile.
    """


def placeDaemonFiles(server: Any, identity: str) -> None:
    """
    Put twistd's pidfile, and in daemon mode its log, in the identity
    directory when they were left at twistd's defaults (C{twistd.pid} and
    C{twistd.log} in the current directory), so that two daemons started
    from one directory do not collide.

    @param server: twistd's C{ServerOptions} (our options' C{parent}), or
        L{None} when the options were parsed outside twistd.
    @param identity: the identity directory.
    """
    if server is None:
        return
    directory = os.path.abspath(identity)
    if server.get("pidfile") == TWISTD_PIDFILE:
        server["pidfile"] = os.path.join(directory, TWISTD_PIDFILE)
    foreground = server.get("nodaemon") or server.get("debug")
    if not server.get("logfile") and not foreground and not server.get("syslog"):
        server["logfile"] = os.path.join(directory, TWISTD_LOGFILE)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process: alive.
        return True
    return True


def lockHolder(path: str) -> int | None:
    """
    The live process that holds the lock Twisted takes for the UNIX socket
    C{path} (a symbolic link C{PATH.lock} naming a pid), if one does.
    """
    try:
        pid = int(os.readlink(path + ".lock"))
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and _alive(pid) else None


def pidfileHolder(path: str) -> int | None:
    """
    The live process that the pidfile C{path} names, if one does.
    """
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and _alive(pid) else None


def refuseSecondDaemon(control: str, identity: str, server: Any) -> None:
    """
    Refuse to start when another daemon already serves C{identity} (it holds
    the lock of the control socket) or runs with our pidfile.  Called while
    the options are parsed: before twistd's own pidfile check, whose message
    is several lines long and does not name the identity.

    @raise SystemExit: with one line that names the other process's pid.
    """
    from twisted.internet import reactor

    try:
        endpoint = serverFromString(reactor, control)
    except (ValueError, KeyError, TypeError):
        # A bad description is refused, with its reason, by makeService.
        endpoint = None
    if isinstance(endpoint, UNIXServerEndpoint) and getattr(
        endpoint, "_wantPID", False
    ):
        path = str(getattr(endpoint, "_address", ""))
        pid = lockHolder(path)
        if pid is not None:
            raise SystemExit(
                f"twistd dwtrust: another dwtrust daemon (pid {pid}) already"
                f" serves the identity in {os.path.abspath(identity)}: it holds"
                f" the control socket {os.path.abspath(path)}; stop it first"
                f" (kill {pid}), or give another"
                " --identity"
            )
    pidfile = server.get("pidfile") if server is not None else None
    if pidfile:
        pid = pidfileHolder(os.path.abspath(pidfile))
        if pid is not None:
            raise SystemExit(
                f"twistd dwtrust: another process (pid {pid}) runs with the"
                f" pidfile {os.path.abspath(pidfile)}; stop it first"
                f" (kill {pid}), or give twistd another --pidfile"
            )


def _where(interface: str, port: int) -> str:
    return f"{interface} port {port}" if interface else f"port {port}"


def checkCanListen(reactor: Any, option: str, description: str) -> None:
    """
    Check that the TCP port C{description} names can be bound now, by
    binding a socket to it and closing it again, and that a UNIX socket's
    directory lets us create it; other endpoints (sockets handed over by
    systemd, port 0) are left to the start.  Nothing is held: a UNIX
    socket's lock is only looked at (L{refuseSecondDaemon}), since one taken
    here would name this process, which twistd is about to leave.

    @param option: the option that gave it, for the message.
    @raise StartupError: if it cannot be bound.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError):
        return
    if isinstance(endpoint, UNIXServerEndpoint):
        _checkSocketDirectory(option, str(getattr(endpoint, "_address", "")))
        return
    if not isinstance(
        endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)
    ):
        return
    port = getattr(endpoint, "_port", 0)
    interface = str(getattr(endpoint, "_interface", ""))
    if not isinstance(port, int) or not port:
        return
    v6 = isinstance(endpoint, TCP6ServerEndpoint) or ":" in interface
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET) as probe:
        # As Twisted does, so that a port in TIME_WAIT is no obstacle.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface, port))
        except OSError as e:
            raise StartupError(
                f"cannot listen on {_where(interface, port)} ({option}"
                f" {description}): {_listenAdvice(e, port, option)}"
            ) from None


def _checkSocketDirectory(option: str, path: str) -> None:
    """
    Check that a UNIX socket can be made at C{path}: its directory, if it
    exists already (an identity directory may not yet), lets this user
    create files.

    @raise StartupError: if it does not.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return
    effective = os.access in os.supports_effective_ids
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=effective):
        raise StartupError(
            permissionAdvice(
                os.path.abspath(path), f"create the UNIX socket ({option})", option
            )
        )


def _listenAdvice(error: OSError, port: int, option: str) -> str:
    reason = (error.strerror or str(error)).lower()
    if error.errno == errno.EADDRINUSE:
        return (
            f"{reason}: another program listens there; stop it, or give"
            f" another port with {option}"
        )
    if error.errno == errno.EACCES and port < 1024:
        return (
            f"{reason}: ports below 1024 need CAP_NET_BIND_SERVICE"
            " (AmbientCapabilities= in a systemd unit); or give a port of"
            f" 1024 or more with {option}"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{reason}: no interface of this machine has that address"
    return reason


def removePidfile(server: Any) -> None:
    """
    Remove the pidfile twistd wrote for this process, if it did.
    """
    pidfile = server.get("pidfile") if server is not None else None
    if not pidfile:
        return
    try:
        with open(pidfile) as f:
            ours = int(f.read().strip()) == os.getpid()
    except (OSError, ValueError):
        return
    if ours:
        try:
            os.unlink(pidfile)
        except OSError as e:
            log.warn(
                "dwtrust: cannot remove the pidfile {pidfile}: {reason}",
                pidfile=pidfile,
                reason=e.strerror,
            )


def startupFailed(server: Any, message: str) -> NoReturn:
    """
    End a start-up that failed after twistd began to run the daemon.

    The message is logged; then, in daemon mode (twistd gave us a status
    pipe), L{StartupError} is raised, which twistd reports to the waiting
    parent (it exits 1) and for which it removes the pidfile.  In the
    foreground the message is one line on standard error (twistd sends
    C{sys.stderr} to its log by now, so the process's own is used), the
    pidfile twistd wrote is removed, and the process exits 1.

    @param server: twistd's C{ServerOptions}, or L{None} outside twistd.
    """
    log.error(
        "twistd dwtrust: {message}",
        event="dwtrust.daemon.start_failed",
        message=message,
    )
    if server is not None and server.get("statusPipe") is not None:
        raise StartupError(message)
    if server is None:
        raise SystemExit(f"twistd dwtrust: {message}")
    removePidfile(server)
    stderr = sys.__stderr__
    if stderr is not None:
        stderr.write(f"twistd dwtrust: {message}\n")
        stderr.flush()
    raise SystemExit(1)


def describeTarget(description: str) -> str:
    """
    C{HOST:PORT} for a plain C{tcp:} client endpoint description, or the
    description itself.
    """
    parts = dict(
        p.split("=", 1) for p in description.split(":")[1:] if p.count("=") == 1
    )
    if description.startswith("tcp:") and "host" in parts and "port" in parts:
        return f"{parts['host']}:{parts['port']}"
    return description


def probeForward(reactor: Any, description: str) -> Deferred[bool]:
    """
    Check once whether something accepts connections at the forwarding
    target C{description}, and warn if nothing does: the daemon would then
    close every trusted peer's connection.  Never fails.

    The application is not disturbed where that can be helped: for a target
    on loopback the kernel's table of listening sockets (C{/proc/net/tcp})
    answers, and for a UNIX socket the file itself; only a target elsewhere
    (or where there is no such table) gets one connection, closed at once.

    @return: a L{Deferred} that fires with whether something accepts.
    """
    target = describeTarget(description)

    def answered(accepts: bool) -> bool:
        if not accepts:
            log.warn(
                "dwtrust: nothing accepts connections on {target} yet: start"
                " your application there, or give --forward",
                event="dwtrust.daemon.forward_unreachable",
                target=target,
            )
        return accepts

    try:
        endpoint = clientFromString(reactor, description)
    except (ValueError, KeyError, TypeError):
        return succeed(True)
    known = _listenerKnown(endpoint)
    if known is not None:
        return succeed(answered(known))

    def accepted(protocol: Protocol) -> bool:
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        return True

    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    try:
        connecting: Deferred[Any] = endpoint.connect(factory)
    except Exception:
        return succeed(answered(False))
    timeout = IReactorTime(reactor).callLater(PROBE_TIMEOUT, connecting.cancel)

    def done(result: Any) -> Any:
        if timeout.active():
            timeout.cancel()
        return result

    return (
        connecting.addBoth(done)
        .addCallbacks(accepted, lambda _: False)
        .addCallback(answered)
    )


def _listenerKnown(endpoint: Any) -> bool | None:
    """
    Whether a socket listens where the client endpoint C{endpoint} would
    connect, if that can be known without connecting: for TCP on loopback
    (from C{/proc/net/tcp} and C{tcp6}) and for UNIX sockets; otherwise
    L{None}.
    """
    if isinstance(endpoint, UNIXClientEndpoint):
        try:
            mode = os.stat(str(getattr(endpoint, "_path", ""))).st_mode
        except OSError:
            return False
        return statModule.S_ISSOCK(mode)
    if not isinstance(endpoint, (TCP4ClientEndpoint, TCP6ClientEndpoint)):
        return None
    host, port = getattr(endpoint, "_host", None), getattr(endpoint, "_port", None)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(str(host))
    except ValueError:
        return None
    if not address.is_loopback or not isinstance(port, int):
        return None
    listeners = _tcpListeners()
    if listeners is None:
        return None
    wildcards = {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")}
    for listening, listeningPort in listeners:
        if listeningPort != port:
            continue
        if isinstance(listening, ipaddress.IPv6Address) and listening.ipv4_mapped:
            listening = listening.ipv4_mapped
        if listening == address or listening in wildcards:
            return True
    return False


def _tcpListeners() -> (
    list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] | None
):
    """
    The addresses and ports of this host's listening TCP sockets, from
    C{/proc/net/tcp} and C{/proc/net/tcp6} (Linux), or L{None} where there
    are no such files.
    """
    found: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    readable = False
    for name in ["/proc/net/tcp", "/proc/net/tcp6"]:
        try:
            with open(name) as table:
                lines = table.readlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            # The state 0A is LISTEN.
            if len(fields) < 4 or fields[3] != "0A":
                continue
            hexAddress, _, hexPort = fields[1].partition(":")
            # Each 32-bit word is printed in the host's byte order.
            raw = b"".join(
                struct.pack("=I", int(hexAddress[i : i + 8], 16))
                for i in range(0, len(hexAddress), 8)
            )
            found.append((ipaddress.ip_address(raw), int(hexPort, 16)))
    return found if readable else None


def describeListening(port: IListeningPort) -> str:
    """
    Where C{port} listens, in words: C{every interface (0.0.0.0), port 7443}
    or C{127.0.0.1 port 7443}.
    """
    address = port.getHost()
    host = getattr(address, "host", None)
    number = getattr(address, "port", None)
    if host is None or number is None:
        return str(getattr(address, "name", address))
    if host in ("0.0.0.0", "::", ""):
        return f"every interface ({host or '0.0.0.0'}), port {number}"
    return f"{host} port {number}"
