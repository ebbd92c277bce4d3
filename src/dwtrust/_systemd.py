"""
The service manager's side of the daemon: systemd's readiness protocol
(C{sd_notify}) and reloading on C{SIGHUP}.

C{sd_notify} is one datagram to the C{AF_UNIX} socket that C{$NOTIFY_SOCKET}
names (in the abstract namespace when the name starts with C{@}), written
here in a few lines rather than taken from a dependency: PyPI's C{sdnotify}
(0.3.2) is those same few lines, unreleased since 2017, and
C{systemd-python} ships only a source distribution that needs libsystemd's
headers and a C compiler to install.

Twisted's C{twistd} leaves C{SIGHUP} alone (it rotates its log file on
C{SIGUSR1}, which keeps working), so the daemon takes it: a handler installed
with L{signal.signal} hands the reload to the reactor with
L{callFromThread <twisted.internet.interfaces.IReactorThreads.callFromThread>},
the one reactor call safe in a signal handler.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ReloadError(Exception):
    """
    The configuration cannot be read again: C{str()} says which file and
    why, in one line.
    """


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Tell the service manager C{state} (C{"READY=1"}, C{"STOPPING=1"}, ...),
    if C{$NOTIFY_SOCKET} names one; never block, never raise.

    @return: whether the datagram was sent.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warn(
            "dwtrust: NOTIFY_SOCKET={address} is not a UNIX socket; systemd"
            " is not told {state}",
            event="dwtrust.systemd.unsupported",
            address=address,
            state=state,
        )
        return False
    try:
        with socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        ) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn(
            "dwtrust: cannot tell systemd {state} through {address}: {error}",
            event="dwtrust.systemd.failed",
            address=address.replace("\0", "@"),
            state=state,
            error=e.strerror or str(e),
        )
        return False
    return True


def reloading() -> str:
    """
    The C{RELOADING=1} message, with the C{CLOCK_MONOTONIC} time that
    systemd 253 and later ask for.
    """
    return f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}"


class ServiceManager(Service):
    """
    Tells systemd C{READY=1} once started (the ports bound and the store
    open: start it after everything else), C{STOPPING=1} when stopping, and
    reloads on C{SIGHUP}, between C{RELOADING=1} and C{READY=1}.

    @ivar reload: reads the configuration again; a failure is logged and
        the configuration in force stays.
    """

    def __init__(
        self,
        reload: Callable[[], Awaitable[None]],
        callFromThread: Callable[..., Any],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.reload = reload
        self._callFromThread = callFromThread
        self._environ = environ
        self._previous: Any = None
        self._installed = False
        self._busy = False
        self._again = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._signalled)
            self._installed = True
        notify("READY=1", self._environ)

    def stopService(self) -> Any:
        notify("STOPPING=1", self._environ)
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous)
            self._installed = False
        return super().stopService()  # type: ignore[no-untyped-call]

    def _signalled(self, number: int, frame: FrameType | None) -> None:
        self._callFromThread(self.reloadNow)

    def reloadNow(self) -> None:
        """
        Reload, or reload once more after the reload under way.
        """
        if self._busy:
            self._again = True
            return
        self._busy = True
        notify(reloading(), self._environ)
        Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> None:
        try:
            await self.reload()
        except ReloadError as e:
            log.error(
                "dwtrust: NOT reloaded: {error}; the configuration in force stays",
                event="dwtrust.reload.failed",
                error=str(e),
            )
        except Exception:
            log.failure(
                "dwtrust: reloading failed; the configuration in force stays",
                Failure(),
                event="dwtrust.reload.failed",
            )
        finally:
            self._busy = False
            notify("READY=1", self._environ)
        if self._again:
            self._again = False
            self.reloadNow()
