"""
The C{dwtrust:} endpoint strings, so that any program using
C{serverFromString} or C{clientFromString} can use dwtrust::

    dwtrust:tcp:8443:identity=/srv/ledger/identity[:approver=known-only]
        [:store=PATH][:timeout=SECONDS]
    dwtrust:tcp:host=ledger.example:port=8443:identity=/srv/billing/identity
        [:strict=yes][:expect=acme/ledger][:pin=NAME][:store=PATH]

Everything that is not a dwtrust parameter describes the endpoint underneath,
in its own syntax.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer

from ._identity import Identity, IdentityError
from ._wrap import (
    DEFAULT_TIMEOUT,
    STORE_FILE,
    Authenticator,
    ClientEndpoint,
    openAuthenticator,
)

_TRUE = {"yes", "true", "1", "on"}
_FALSE = {"no", "false", "0", "off"}


def quoteArgument(value: str) -> str:
    """
    Escape C{value} for use as one argument in an endpoint description.
    """
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _inner(args: tuple[str, ...], kwargs: dict[str, str]) -> str:
    parts = [quoteArgument(a) for a in args]
    parts += [f"{quoteArgument(k)}={quoteArgument(v)}" for k, v in kwargs.items()]
    return ":".join(parts)


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be yes or no, not {value!r}")


def _common(kwargs: dict[str, str]) -> tuple[Identity, FilePath[str], float]:
    directory = kwargs.pop("identity", None)
    if directory is None:
        raise ValueError("a dwtrust endpoint needs identity=DIRECTORY")
    identityPath = FilePath(directory)
    try:
        identity = Identity.load(identityPath)
    except IdentityError as e:
        raise ValueError(str(e)) from None
    store = FilePath(kwargs.pop("store", identityPath.child(STORE_FILE).path))
    timeout = float(kwargs.pop("timeout", DEFAULT_TIMEOUT))
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return identity, store, timeout


@implementer(IStreamServerEndpoint)
class _StringServerEndpoint:
    def __init__(
        self,
        reactor: IReactorTime,
        inner: IStreamServerEndpoint,
        identity: Identity,
        store: FilePath[str],
        approver: str,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._inner = inner
        self._identity = identity
        self._store = store
        self._approver = approver
        self._timeout = timeout

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        opening = openAuthenticator(
            self._reactor,
            self._identity,
            self._store,
            self._approver,
            timeout=self._timeout,
        )

        def opened(authenticator: Authenticator) -> Deferred[IListeningPort]:
            listening = authenticator.serverEndpoint(self._inner).listen(
                protocolFactory
            )

            def failed(failure: Any) -> Any:
                authenticator.close()
                return failure

            return listening.addCallbacks(
                lambda port: _ClosingPort(port, authenticator), failed
            )

        return opening.addCallback(opened)


@implementer(IListeningPort)
class _ClosingPort:
    """
    A listening port that closes its store when it stops listening.
    """

    def __init__(self, port: IListeningPort, authenticator: Authenticator) -> None:
        self._port = port
        self._authenticator = authenticator

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None] | None:
        stopping = maybeDeferred(self._port.stopListening)
        return stopping.addBoth(lambda result: self._authenticator.close())

    def getHost(self) -> IAddress:
        return self._port.getHost()


@implementer(IStreamClientEndpoint)
class _StringClientEndpoint:
    """
    Each connection opens the store (for the pins) and closes it when the
    connection ends.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        inner: IStreamClientEndpoint,
        identity: Identity,
        store: FilePath[str],
        pin: str,
        strict: bool,
        expect: str | None,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._inner = inner
        self._identity = identity
        self._store = store
        self._pin = pin
        self._strict = strict
        self._expect = expect
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        authenticator = await openAuthenticator(
            self._reactor,
            self._identity,
            self._store,
            strict=self._strict,
            expectedServer=self._expect,
            timeout=self._timeout,
        )
        endpoint = ClientEndpoint(authenticator, self._inner, self._pin)
        try:
            application, handshake = await endpoint.connectHandshake(protocolFactory)
        except BaseException:
            await authenticator.close()
            raise
        handshake.whenClosed().addCallback(lambda _: authenticator.close())
        return application


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ServerParser:
    """
    Parses C{dwtrust:} server endpoint strings.
    """

    prefix = "dwtrust"

    def parseStreamServer(
        self, reactor: Any, *args: Any, **kwargs: Any
    ) -> IStreamServerEndpoint:
        identity, store, timeout = _common(kwargs)
        approver = kwargs.pop("approver", "known-only")
        inner = serverFromString(reactor, _inner(args, kwargs))
        return _StringServerEndpoint(reactor, inner, identity, store, approver, timeout)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class ClientParser:
    """
    Parses C{dwtrust:} client endpoint strings.
    """

    prefix = "dwtrust"

    def parseStreamClient(
        self, reactor: Any, *args: Any, **kwargs: Any
    ) -> IStreamClientEndpoint:
        identity, store, timeout = _common(kwargs)
        strict = _flag("strict", kwargs.pop("strict", "no"))
        expect = kwargs.pop("expect", None)
        pin = kwargs.pop("pin", None)
        description = _inner(args, kwargs)
        if pin is None:
            host, port = kwargs.get("host"), kwargs.get("port")
            pin = f"{host}:{port}" if host and port else description
        inner = clientFromString(reactor, description)
        return _StringClientEndpoint(
            reactor, inner, identity, store, pin, strict, expect, timeout
        )
