"""
Connections and pins: C{dwtrust connect}, C{pin} and C{forget}.

C{connect} ends with one of the exit statuses below (the table in
C{docs/daemon.rst}), and says in one plain sentence on standard error,
naming the address, why it did not end with 0.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from attrs import define, field
from OpenSSL import SSL
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorCore,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from .._forward import APPLICATION_DOWN
from .._identity import Identity, IdentityError, PeerIdentity, PublicKey, validateName
from .._machine import Refusal
from .._options import positive, seconds
from .._policy import ITrustPolicy, PinningPolicy
from .._protocol import HandshakeFailed, HandshakeProtocol
from .._sidecar import SidecarError, remoteEndpoint
from .._wire import EXPLANATIONS, ErrorCode
from .._wrap import DEFAULT_DECISION_TIMEOUT, DEFAULT_TIMEOUT, Authenticator
from ..store import SQLiteStore, StoreError
from ._common import FAILED, OK, REFUSED, CommandError, _AddressOptions

#: Exit statuses of C{dwtrust connect}, besides OK (0), FAILED (1), USAGE (2)
#: and REFUSED (3).
TIMED_OUT = 4
UNREACHABLE = 5
APPLICATION_DOWN_STATUS = 6
REVOKED = 7
INTERRUPTED = 130

#: Seconds after its proof before C{connect} says it is held for approval.
HELD_NOTICE = 2.0

_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def _checkAddress(address: str) -> None:
    """
    Check that C{address} is C{HOST:PORT} or a client endpoint description.

    @raise usage.UsageError: with one sentence, if it is not.
    """
    from twisted.internet import reactor

    try:
        remoteEndpoint(reactor, address)
    except SidecarError as e:
        raise usage.UsageError(str(e)) from None


class ConnectOptions(_AddressOptions):
    synopsis = "--identity DIR [options] HOST:PORT"
    longdesc = (
        "Connect to a dwtrust service and relay standard input to it and its "
        "output to standard output, like netcat. The server's key is pinned on "
        "first use; a changed key is refused. Exit statuses: 0 done, 1 failed, "
        "2 usage, 3 refused, 4 timed out, 5 unreachable, 6 the application "
        "behind the service is down, 7 revoked, 130 interrupted."
    )
    optFlags = [
        ["strict", None, "Refuse servers whose key is not pinned yet."],
        ["json", None, "Print the outcome as one JSON object on stderr."],
    ]
    optParameters = [
        *_AddressOptions.optParameters,
        ["expect", "e", None, "Refuse a server that is not this ORG/SERVICE."],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "Seconds allowed for the handshake (a held connection waits the"
            f" service's decision time, {DEFAULT_DECISION_TIMEOUT:g}, plus this).",
            positive,
        ],
        [
            "quit-after",
            "q",
            1.0,
            "After the end of input, close once the server has been silent for"
            " this many seconds.",
            seconds,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["expect-fingerprint"] = []

    def opt_expect_fingerprint(self, fingerprint: str) -> None:
        """
        Refuse a server whose key is not this one (SHA256:...); repeat to
        allow any of several.  The key is pinned as on first use.
        """
        if not _FINGERPRINT.match(fingerprint):
            raise usage.UsageError(
                f"--expect-fingerprint {fingerprint!r} is not a SHA256:..."
                " fingerprint (as dwtrust show prints)"
            )
        self["expect-fingerprint"].append(fingerprint)

    def postOptions(self) -> None:
        super().postOptions()
        _checkAddress(self["address"])


class PinOptions(_AddressOptions):
    synopsis = "--identity DIR [--replace] [--name ORG/SERVICE] HOST:PORT PUBKEY_FILE"
    longdesc = (
        "Pin a server's key for HOST:PORT before the first connection, like"
        " adding it to ssh's known_hosts. PUBKEY_FILE is the server's"
        " id_dwtrust.pub (an OpenSSH public-key line whose comment is"
        " ORG/SERVICE, or give --name)."
    )
    optFlags = [["replace", None, "Replace a different key pinned already."]]
    optParameters = [
        *_AddressOptions.optParameters,
        ["name", "n", None, "The server's ORG/SERVICE, if the file does not say."],
    ]

    def parseArgs(self, address: str, key: str) -> None:  # type: ignore[override]
        self["address"] = address
        self["key"] = key

    def postOptions(self) -> None:
        super().postOptions()
        if _FINGERPRINT.match(self["key"]):
            raise usage.UsageError(
                "a pin needs the server's public key (its id_dwtrust.pub), not"
                " only its fingerprint; to check a fingerprint on the first"
                " connection, use dwtrust connect --expect-fingerprint"
            )
        _checkAddress(self["address"])


class ForgetOptions(_AddressOptions):
    synopsis = "--identity DIR HOST:PORT"
    longdesc = "Remove the pinned server key for HOST:PORT, like ssh-keygen -R."


# The outcome


def _peerJSON(peer: PeerIdentity | None) -> dict[str, str] | None:
    if peer is None:
        return None
    return {
        "organization": peer.org,
        "service": peer.service,
        "algorithm": peer.algorithm,
        "fingerprint": peer.fingerprint,
    }


@define
class Outcome:
    """
    How a C{dwtrust connect} ended.

    @ivar status: the exit status.
    @ivar outcome: one word for it (the C{outcome} of C{--json}).
    @ivar message: the sentence for standard error (empty for success).
    @ivar reason: the refusal's error code, if a refusal ended it.
    @ivar hints: lines to print after the message.
    """

    status: int
    outcome: str
    message: str = ""
    reason: str | None = None
    hints: list[str] = field(factory=list)

    def report(self, address: str, peer: PeerIdentity | None, asJSON: bool) -> str:
        text = "".join(
            f"dwtrust: {line}\n" for line in [self.message, *self.hints] if line
        )
        if asJSON:
            text += (
                json.dumps(
                    {
                        "address": address,
                        "status": self.status,
                        "outcome": self.outcome,
                        "reason": self.reason,
                        "message": self.message or None,
                        "peer": _peerJSON(peer),
                    }
                )
                + "\n"
            )
        return text


def _refusalOutcome(
    failure: HandshakeFailed, address: str, identityDir: str, me: Identity | None
) -> Outcome:
    """
    The outcome of a refusal, either way.
    """
    code = failure.code
    if code is ErrorCode.timeout:
        if failure.byPeer:
            message = (
                f"connect to {address}: timed out: the server gave up on this"
                f" client's handshake ({failure.message})"
            )
        else:
            message = (
                f"connect to {address}: timed out: the server did not finish the"
                " handshake in time (see --timeout)"
            )
        return Outcome(TIMED_OUT, "timeout", message, code.value)
    if (
        failure.byPeer
        and code is ErrorCode.unavailable
        and failure.message.startswith(APPLICATION_DOWN)
    ):
        return Outcome(
            APPLICATION_DOWN_STATUS,
            "application_down",
            f"connect to {address}: {failure.message}",
            code.value,
        )
    if failure.byPeer:
        lines = [f"({EXPLANATIONS[code]})"]
        if code is ErrorCode.identity_changed:
            lines = [
                "(the service refused this client's key: it knows this client's"
                " name with another key, or this key under another name)",
                "if this client's key or name changed on purpose, the service's"
                " owners must revoke the old key and approve this one"
                + (f" ({me.fingerprint})" if me is not None else ""),
            ]
        return Outcome(
            REFUSED,
            "refused",
            f"connect to {address}: the server refused this client:"
            f" {code.value}: {failure.message}",
            code.value,
            lines,
        )
    if code in (ErrorCode.pending, ErrorCode.unavailable):
        return Outcome(
            FAILED,
            "failed",
            f"connect to {address}: this client's own trust store did not answer"
            f" in time ({code.value}): {failure.message}",
            code.value,
        )
    if code in (ErrorCode.protocol_error, ErrorCode.version_unsupported):
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: it is not a dwtrust service"
            f" ({code.value}: {failure.message})",
            code.value,
        )
    lines = [f"({_LOCAL_EXPLANATIONS.get(code, EXPLANATIONS[code])})"]
    if code is ErrorCode.identity_changed:
        lines.append(
            "if the server's key was replaced on purpose, forget the old"
            f" one with: dwtrust forget --identity {identityDir} {address}"
        )
    return Outcome(
        REFUSED,
        "refused",
        f"connect to {address}: refused the server: {code.value}: {failure.message}",
        code.value,
        lines,
    )


def _lostOutcome(reason: Failure, address: str, proved: bool) -> Outcome:
    """
    The outcome of a connection that ended otherwise than by a refusal,
    before the server accepted us.
    """
    if reason.check(CancelledError):
        return Outcome(INTERRUPTED, "interrupted", f"connect to {address}: interrupted")
    if reason.check(netError.DNSLookupError):
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: cannot resolve the host name",
        )
    if reason.check(netError.ConnectionRefusedError):
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: the connection was refused (nothing listens there)",
        )
    if reason.check(netError.ConnectError):
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: cannot reach it"
            f" ({_plain(reason.getErrorMessage())})",
        )
    if reason.check(SSL.Error) and not proved:
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: it is not a dwtrust service (no TLS"
            " handshake with it succeeded)",
        )
    if not proved:
        return Outcome(
            UNREACHABLE,
            "unreachable",
            f"connect to {address}: the server closed the connection before any"
            " dwtrust handshake (it is not a dwtrust service, or it turned this"
            " connection away)",
        )
    return Outcome(
        FAILED,
        "failed",
        f"connect to {address}: the server closed the connection before"
        " accepting this client",
    )


def _plain(text: str) -> str:
    """
    An error message's first line, without Python's trailing period noise.
    """
    return text.splitlines()[0].rstrip(".") if text else "no reason given"


#: Explanations for refusals this client made, where the peer's would mislead.
_LOCAL_EXPLANATIONS = {
    ErrorCode.denied: "this client does not trust the server's key",
    ErrorCode.unavailable: "this client's own trust store did not answer in time",
}


def _explainRefusal(failure: HandshakeFailed, options: usage.Options) -> str:
    """
    A refusal of another command's handshake (not C{connect}), explained.
    """
    address = options.get("address") or "the server"
    outcome = _refusalOutcome(failure, address, options.get("identity", ""), None)
    return outcome.report(address, None, False)


# The connection


class _StdioBridge(Protocol):
    """
    Relays standard input to the server, and the server to standard output.
    """

    transport: Any  # an IAuthenticatedTransport

    def __init__(self, reactor: Any, quitAfter: float, done: Deferred[tuple[Failure]]):
        self._reactor = reactor
        self._quitAfter = quitAfter
        self._done = done
        self._quitting: Any = None
        self._inputEnded = False
        self._trusted = False
        self._stdio: StandardIO | None = None

    def connectionMade(self) -> None:
        self._stdio = StandardIO(_Stdin(self), reactor=self._reactor)
        # The server may hold us while its owners decide: the quiet time
        # after the end of input counts only once it has accepted us.
        self.transport.whenTrusted().addCallbacks(self._accepted, lambda _: None)

    def _accepted(self, _: object) -> None:
        self._trusted = True
        if self._inputEnded:
            self._scheduleQuit()

    def dataReceived(self, data: bytes) -> None:
        assert self._stdio is not None
        self._stdio.write(data)
        if self._inputEnded:
            self._scheduleQuit()

    def inputEnded(self) -> None:
        self._inputEnded = True
        self._scheduleQuit()

    def _scheduleQuit(self) -> None:
        if not self._trusted:
            return
        if self._quitting is not None and self._quitting.active():
            self._quitting.cancel()
        self._quitting = self._reactor.callLater(
            self._quitAfter, self.transport.loseConnection
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._quitting is not None and self._quitting.active():
            self._quitting.cancel()
        if self._stdio is not None:
            self._stdio.loseConnection()
        # In a tuple: a Deferred fired with a Failure would fail.
        self._done.callback((reason,))


@implementer(IHalfCloseableProtocol)
class _Stdin(Protocol):
    """
    Standard input; its end leaves standard output open.
    """

    def __init__(self, bridge: _StdioBridge) -> None:
        self._bridge = bridge

    def dataReceived(self, data: bytes) -> None:
        self._bridge.transport.write(data)

    def readConnectionLost(self) -> None:
        self._bridge.inputEnded()

    def writeConnectionLost(self) -> None:
        self._bridge.transport.loseConnection()


@implementer(ITrustPolicy)
class _ExpectFingerprint:
    """
    Refuses a server whose key is not one of C{fingerprints}, then pins it
    as on first use (through C{pinning}).
    """

    def __init__(self, fingerprints: Iterable[str], pinning: PinningPolicy) -> None:
        self.fingerprints = list(fingerprints)
        self.pinning = pinning

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        if peer.fingerprint not in self.fingerprints:
            expected = " or ".join(self.fingerprints)
            return fail(
                Refusal(
                    ErrorCode.denied,
                    f"the server at {source} presented {peer.name}"
                    f" {peer.fingerprint}, but --expect-fingerprint gave {expected}",
                )
            )
        return self.pinning.check(peer, source)


@define
class _Connection:
    """
    One C{dwtrust connect}: what it knows so far, and how to interrupt it.
    """

    reactor: Any
    options: ConnectOptions
    err: TextIO
    identity: Identity | None = None
    handshake: HandshakeProtocol | None = None
    connecting: Deferred[Any] | None = None
    interrupted: bool = False
    notice: IDelayedCall | None = None

    @property
    def address(self) -> str:
        address: str = self.options["address"]
        return address

    @property
    def peer(self) -> PeerIdentity | None:
        return self.handshake.peer if self.handshake is not None else None

    def interrupt(self) -> None:
        self.interrupted = True
        if self.handshake is not None and self.handshake.transport is not None:
            self.handshake.transport.abortConnection()
        elif self.connecting is not None:
            self.connecting.cancel()

    def heldNotice(self) -> None:
        self.notice = None
        assert self.identity is not None
        peer = self.peer
        owners = f"{peer.name}'s owners" if peer else "the service's owners"
        self.err.write(
            f"dwtrust: waiting for {owners} at {self.address} to approve this"
            f" key ({self.identity.fingerprint}) — Ctrl-C to give up, or"
            " --timeout\n"
        )
        self.err.flush()

    def stopNotice(self, result: object) -> object:
        notice, self.notice = self.notice, None
        if notice is not None and notice.active():
            notice.cancel()
        return result

    async def run(self) -> Outcome:
        options = self.options
        try:
            self.identity = identity = Identity.load(options.directory)
            store = await SQLiteStore.open(options.store)
        except (IdentityError, StoreError) as e:
            return Outcome(FAILED, "failed", f"connect to {self.address}: {e}")
        try:
            return await self._connect(identity, store)
        finally:
            await store.close()

    async def _connect(self, identity: Identity, store: SQLiteStore) -> Outcome:
        options = self.options
        inner = remoteEndpoint(self.reactor, self.address)
        expecting = options["expect-fingerprint"]
        pinning = PinningPolicy(
            store, options["strict"] and not expecting, options["expect"]
        )
        policy: ITrustPolicy = (
            _ExpectFingerprint(expecting, pinning) if expecting else pinning
        )
        authenticator = Authenticator(
            identity,
            None,
            policy,
            IReactorCore(self.reactor),  # type: ignore[arg-type]
            options["timeout"],
        )
        done: Deferred[tuple[Failure]] = Deferred()
        factory = Factory.forProtocol(
            lambda: _StdioBridge(self.reactor, options["quit-after"], done)
        )
        proved = False
        try:
            self.connecting = inner.connect(
                authenticator.wrapClientFactory(factory, self.address)
            )
            tls: Any = await self.connecting
            self.connecting = None
            self.handshake = tls.wrappedProtocol
            assert self.handshake is not None
            if self.interrupted:
                self.interrupt()
            # The owners' decision may hold us before the application is
            # connected (version 2, a server not pinned yet) or after it.
            self.notice = self.reactor.callLater(HELD_NOTICE, self.heldNotice)
            trusted: list[bool] = []
            self.handshake.whenTrusted().addBoth(self.stopNotice).addCallbacks(
                lambda _: trusted.append(True), lambda _: None
            )
            await self.handshake.whenConnected()
        except Exception:
            self.stopNotice(None)
            return self._failed(Failure(), proved)
        proved = True
        (reason,) = await done
        if self.interrupted:
            return self._interrupted(bool(trusted))
        if reason.check(HandshakeFailed):
            return self._failed(reason, proved)
        if not trusted:
            return _lostOutcome(reason, self.address, proved)
        if reason.check(netError.ConnectionDone):
            return Outcome(OK, "done")
        return await self._cut(reason, inner, authenticator)

    def _failed(self, reason: Failure, proved: bool) -> Outcome:
        if self.interrupted:
            return self._interrupted(False)
        if reason.check(HandshakeFailed):
            failure: HandshakeFailed = reason.value  # type: ignore[assignment]
            return _refusalOutcome(
                failure, self.address, self.options["identity"], self.identity
            )
        return _lostOutcome(reason, self.address, proved)

    def _interrupted(self, trusted: bool) -> Outcome:
        if trusted or self.handshake is None or self.handshake.peer is None:
            what = "the connection was closed"
        else:
            what = f"gave up waiting for {self.handshake.peer.name} to accept this key"
        return Outcome(
            INTERRUPTED,
            "interrupted",
            f"connect to {self.address}: interrupted; {what}",
        )

    async def _cut(
        self,
        reason: Failure,
        inner: IStreamClientEndpoint,
        authenticator: Authenticator,
    ) -> Outcome:
        """
        The session was cut: ask the service again, to tell a revocation
        (which closes a key's sessions at once) from a broken connection.
        """
        refusal = await _probe(inner, authenticator, self.address)
        if refusal is not None and refusal.code in (
            ErrorCode.revoked,
            ErrorCode.denied,
        ):
            return Outcome(
                REVOKED,
                "revoked",
                f"connect to {self.address}: the service's owners revoked this"
                f" client's key, and it closed the session ({refusal.code.value}:"
                f" {refusal.message})",
                refusal.code.value,
            )
        return Outcome(
            FAILED,
            "failed",
            f"connect to {self.address}: the connection was cut"
            f" ({_plain(reason.getErrorMessage())})",
        )


async def _probe(
    inner: IStreamClientEndpoint, authenticator: Authenticator, address: str
) -> HandshakeFailed | None:
    """
    Run one more handshake with the server, and close it at once; return
    its refusal, if it refused.
    """
    try:
        tls: Any = await inner.connect(
            authenticator.wrapClientFactory(Factory.forProtocol(Protocol), address)
        )
    except Exception:
        return None
    handshake: HandshakeProtocol = tls.wrappedProtocol
    try:
        await handshake.whenConnected()
        await handshake.whenTrusted()
    except HandshakeFailed as e:
        return e
    except Exception:
        return None
    finally:
        if handshake.transport is not None:
            handshake.transport.abortConnection()
    return None


async def connect(reactor: Any, options: ConnectOptions, err: TextIO) -> int:
    """
    Run C{dwtrust connect}; return its exit status, having said why on
    C{err} if it is not 0.
    """
    connection = _Connection(reactor, options, err)

    def onSignal(signum: int, frame: object) -> None:
        reactor.callFromThread(connection.interrupt)

    previous: Callable[..., Any] | int | None = None
    with contextlib.suppress(ValueError):  # not the main thread
        previous = signal.signal(signal.SIGINT, onSignal)
    try:
        outcome = await connection.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    err.write(outcome.report(connection.address, connection.peer, options["json"]))
    return outcome.status


# Pins


async def _forget(options: ForgetOptions, out: TextIO) -> int:
    store = await SQLiteStore.open(options.store)
    try:
        removed = await store.unpin(options["address"])
    finally:
        await store.close()
    if not removed:
        raise CommandError(f"no key is pinned for {options['address']}")
    out.write(f"forgot the key pinned for {options['address']}\n")
    return OK


def _readServerKey(options: PinOptions) -> PeerIdentity:
    """
    The server identity a C{dwtrust pin} names.

    @raise CommandError: if the file cannot be read or says no name.
    """
    path = options["key"]
    try:
        with open(path, "rb") as f:
            line = f.read(64 * 1024).decode("ascii", "replace").strip()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    try:
        key = PublicKey.fromOpenSSH(line)
    except IdentityError as e:
        raise CommandError(f"{path} is not a dwtrust public key: {e}") from None
    parts = line.split()
    name = options["name"] or (parts[2] if len(parts) > 2 else "")
    org, slash, service = name.partition("/")
    if not slash:
        raise CommandError(
            f"{path} does not name the server's ORG/SERVICE; give --name ORG/SERVICE"
        )
    try:
        validateName("organization", org)
        validateName("service", service)
    except IdentityError as e:
        raise CommandError(str(e)) from None
    return PeerIdentity(org, service, key)


async def _pin(options: PinOptions, out: TextIO) -> int:
    peer = _readServerKey(options)
    address = options["address"]
    store = await SQLiteStore.open(options.store)
    try:
        existing = await store.pinned(address)
        if existing is not None:
            same = (existing.fingerprint, existing.org, existing.service) == (
                peer.fingerprint,
                peer.org,
                peer.service,
            )
            if same:
                out.write(
                    f"{peer.name} {peer.fingerprint} is already pinned for {address}\n"
                )
                return OK
            if not options["replace"]:
                raise CommandError(
                    f"{address} is pinned to another key: {existing.org}/"
                    f"{existing.service} {existing.fingerprint}; give --replace"
                    f" to pin {peer.name} {peer.fingerprint} instead"
                )
            await store.unpin(address)
        await store.pin(address, peer)
    finally:
        await store.close()
    out.write(f"pinned {peer.name} {peer.fingerprint} for {address}\n")
    return OK
