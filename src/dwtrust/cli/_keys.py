"""
Identities and connections: C{dwtrust keygen}, C{show}, C{connect} and
C{forget}.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IReactorCore,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from .._identity import SHORT_NAMES, Identity
from .._policy import PinningPolicy
from .._protocol import HandshakeFailed
from .._wire import EXPLANATIONS, ErrorCode
from .._wrap import DEFAULT_TIMEOUT, Authenticator
from ..store import SQLiteStore
from ._common import OK, CommandError, _address, _AddressOptions, _IdentityOptions


class KeygenOptions(_IdentityOptions):
    synopsis = "--identity DIR --org ORG --service NAME [--algorithm ALG]"
    optParameters = [
        *_IdentityOptions.optParameters,
        ["org", "o", None, "The organization name."],
        ["service", "s", None, "The service name."],
        [
            "algorithm",
            "a",
            "ed25519",
            "One of " + ", ".join(sorted(SHORT_NAMES)) + ".",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        for name in ["org", "service"]:
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")


class ShowOptions(_IdentityOptions):
    synopsis = "--identity DIR [--json]"
    optFlags = [["json", None, "Print JSON."]]


class ConnectOptions(_AddressOptions):
    synopsis = "--identity DIR [options] HOST:PORT"
    longdesc = (
        "Connect to a dwtrust service and relay standard input to it and its "
        "output to standard output, like netcat. The server's key is pinned on "
        "first use; a changed key is refused."
    )
    optFlags = [["strict", None, "Refuse servers whose key is not pinned yet."]]
    optParameters = [
        *_AddressOptions.optParameters,
        ["expect", "e", None, "Refuse a server that is not this ORG/SERVICE."],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "Seconds allowed for the handshake.",
            float,
        ],
        [
            "quit-after",
            "q",
            1.0,
            "After the end of input, close once the server has been silent for"
            " this many seconds.",
            float,
        ],
    ]


class ForgetOptions(_AddressOptions):
    synopsis = "--identity DIR HOST:PORT"
    longdesc = "Remove the pinned server key for HOST:PORT, like ssh-keygen -R."


def describe(identity: Identity) -> dict[str, str]:
    return {
        "organization": identity.org,
        "service": identity.service,
        "algorithm": identity.algorithm.name,
        "fingerprint": identity.fingerprint,
        "public_key": identity.publicKey.openssh(identity.name),
    }


def _printIdentity(identity: Identity, asJSON: bool, out: TextIO) -> None:
    facts = describe(identity)
    if asJSON:
        out.write(json.dumps(facts, indent=2) + "\n")
        return
    width = max(len(k) for k in facts) + 1
    for key, value in facts.items():
        out.write(f"{(key.replace('_', ' ') + ':'):<{width + 1}}{value}\n")


def keygen(options: KeygenOptions, out: TextIO) -> int:
    if options.directory.child("id_dwtrust").exists():
        raise CommandError(f"{options.directory.path} already holds an identity")
    identity = Identity.generate(
        options["org"], options["service"], options["algorithm"]
    )
    identity.save(options.directory)
    _printIdentity(identity, False, out)
    return OK


def show(options: ShowOptions, out: TextIO) -> int:
    _printIdentity(Identity.load(options.directory), options["json"], out)
    return OK


class _StdioBridge(Protocol):
    """
    Relays standard input to the server, and the server to standard output.
    """

    transport: Any  # an IAuthenticatedTransport

    def __init__(self, reactor: Any, quitAfter: float, done: Deferred[None]):
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
        if reason.check(HandshakeFailed):
            self._done.errback(reason)
        else:
            self._done.callback(None)


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


async def _connect(reactor: Any, options: ConnectOptions) -> None:
    identity = Identity.load(options.directory)
    store = await SQLiteStore.open(options.store)
    try:
        description, pin = _address(options["address"])
        try:
            inner = clientFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise CommandError(f"bad address {options['address']!r}: {e}") from None
        authenticator = Authenticator(
            identity,
            None,
            PinningPolicy(store, options["strict"], options["expect"]),
            IReactorCore(reactor),  # type: ignore[arg-type]
            options["timeout"],
        )
        done: Deferred[None] = Deferred()
        endpoint = authenticator.clientEndpoint(inner, pin)
        await endpoint.connect(
            Factory.forProtocol(
                lambda: _StdioBridge(reactor, options["quit-after"], done)
            )
        )
        await done
    finally:
        await store.close()


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


#: Explanations for refusals this client made, where the peer's would mislead.
_LOCAL_EXPLANATIONS = {
    ErrorCode.denied: "this client does not trust the server's key",
    ErrorCode.unavailable: "this client's own trust store did not answer in time",
}


def _explainRefusal(failure: HandshakeFailed, options: usage.Options) -> str:
    if failure.byPeer:
        who, explanation = "the server refused this client", EXPLANATIONS[failure.code]
    else:
        who, explanation = (
            "refused the server",
            _LOCAL_EXPLANATIONS.get(failure.code, EXPLANATIONS[failure.code]),
        )
    text = (
        f"dwtrust: {who}: {failure.code.value}: {failure.message}\n"
        f"dwtrust: ({explanation})\n"
    )
    if (
        failure.code is ErrorCode.identity_changed
        and not failure.byPeer
        and options.get("address")
    ):
        text += (
            "dwtrust: if the server's key was replaced on purpose, forget the old"
            f" one with: dwtrust forget --identity {options['identity']}"
            f" {options['address']}\n"
        )
    return text
