"""
The C{dwtrust:} endpoint strings, so that any program using
C{serverFromString} or C{clientFromString} can use dwtrust::

    dwtrust:tcp:8443:identity=/srv/ledger/identity[:approver=known-only]
        [:store=PATH][:timeout=SECONDS]
    dwtrust:tcp:host=ledger.example:port=8443:identity=/srv/billing/identity
        [:strict=yes][:expect=acme/ledger][:pin=NAME][:store=PATH]

Everything that is not a dwtrust parameter describes the endpoint underneath,
in its own syntax.

A server string opens its store when it listens, and closes it when it stops
listening.  Client strings share, per reactor, one authenticator (and so one
store) for each identity, store and options: the first connection opens it,
the others use it, and it is closed L{IDLE_CLOSE} seconds after its last
connection ended, or when the reactor stops (see L{SharedAuthenticators}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from ._identity import Identity, IdentityError
from ._protocol import HandshakeProtocol
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


#: Seconds a client endpoint string's shared authenticator (and its store)
#: stays open after its last connection ended, in case another follows.
IDLE_CLOSE = 2.0

#: What makes two client endpoint strings share an authenticator: the
#: identity's fingerprint, the store's path, C{strict}, C{expect}, and the
#: time-out.
_Key = tuple[str, str, bool, "str | None", float]


@define(eq=False)
class _Shared:
    """
    One authenticator shared by the connections of equal client endpoint
    strings.

    @ivar users: the connections using it, or waiting for it to open.
    @ivar waiting: who waits for it to open.
    """

    key: _Key
    authenticator: Authenticator | None = None
    opening: bool = True
    users: int = 0
    waiting: list[Deferred[Authenticator]] = field(factory=list)
    idle: IDelayedCall | None = None


class SharedAuthenticators:
    """
    The authenticators of one reactor's C{dwtrust:} client endpoint strings,
    one for each distinct identity, store and options, so that a connection
    opens no store of its own.  The first connection opens it, the ones that
    follow (and those started while it opens) share it, and it is closed
    L{IDLE_CLOSE} seconds after its last connection ended, or when the
    reactor stops (before the reactor's threads do), whichever comes first.

    @ivar opened: how many authenticators were opened so far.
    @ivar closed: how many of them were closed so far.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._shared: dict[_Key, _Shared] = {}
        self._stopping = False
        self.opened = 0
        self.closed = 0
        core = IReactorCore(reactor, None)
        if core is not None:
            core.addSystemEventTrigger("before", "shutdown", self._atShutdown)

    def acquire(
        self, key: _Key, open: Callable[[], Deferred[Authenticator]]
    ) -> Deferred[tuple[_Shared, Authenticator]]:
        """
        The authenticator for C{key}, opened with C{open} unless it is open
        (or opening) already.  The caller L{release}s it when its connection
        ends.
        """
        shared = self._shared.get(key)
        new = shared is None
        if shared is None:
            shared = _Shared(key)
            self.opened += 1
            if not self._stopping:
                self._shared[key] = shared
        shared.users += 1
        if shared.idle is not None:
            shared.idle.cancel()
            shared.idle = None
        ready: Deferred[Authenticator]
        if shared.authenticator is not None:
            ready = succeed(shared.authenticator)
        else:
            ready = Deferred()
            shared.waiting.append(ready)
        if new:
            open().addBoth(self._opened, shared)

        def failed(failure: Failure) -> Failure:
            shared.users -= 1
            return failure

        return ready.addCallbacks(lambda a: (shared, a), failed)

    def _opened(self, result: Authenticator | Failure, shared: _Shared) -> None:
        shared.opening = False
        waiting, shared.waiting = shared.waiting, []
        if isinstance(result, Failure):
            # The next connection tries again.
            self._forget(shared)
            for waiter in waiting:
                waiter.errback(result)
            return
        shared.authenticator = result
        for waiter in waiting:
            waiter.callback(result)

    def release(self, shared: _Shared) -> None:
        """
        A connection that used C{shared} ended.
        """
        shared.users -= 1
        if shared.users > 0:
            return
        if self._shared.get(shared.key) is shared:
            shared.idle = self._reactor.callLater(IDLE_CLOSE, self._idle, shared)
        else:
            self._close(shared)

    def _idle(self, shared: _Shared) -> None:
        shared.idle = None
        self._forget(shared)
        self._close(shared)

    def _forget(self, shared: _Shared) -> None:
        if self._shared.get(shared.key) is shared:
            del self._shared[shared.key]

    def _close(self, shared: _Shared) -> Deferred[None]:
        authenticator, shared.authenticator = shared.authenticator, None
        if authenticator is None:
            return succeed(None)
        self.closed += 1
        return authenticator.close()

    def _closeOpened(self, _: Authenticator, shared: _Shared) -> Deferred[None]:
        return self._close(shared)

    def closeAll(self) -> Deferred[None]:
        """
        Close the authenticators no connection uses now, and each of the
        others once its last connection ends; connections made from now on
        open new ones.
        """
        return self._closeAll(False)

    def _atShutdown(self) -> Deferred[None]:
        """
        The reactor is stopping: close every authenticator now (its open
        connections are about to be closed too); a connection made from now
        on opens one of its own, closed when it ends.
        """
        self._stopping = True
        return self._closeAll(True)

    def _closeAll(self, evenUsed: bool) -> Deferred[None]:
        closing: list[Deferred[None]] = []
        for shared in list(self._shared.values()):
            self._forget(shared)
            if shared.idle is not None:
                shared.idle.cancel()
                shared.idle = None
            if shared.opening:
                if evenUsed:
                    opened: Deferred[Authenticator] = Deferred()
                    shared.waiting.append(opened)
                    closing.append(opened.addCallback(self._closeOpened, shared))
            elif evenUsed or shared.users == 0:
                closing.append(self._close(shared))
        return gatherResults(closing, consumeErrors=True).addBoth(lambda _: None)


def closeEndpointStores(reactor: IReactorTime | None = None) -> Deferred[None]:
    """
    Close the stores that C{reactor}'s C{dwtrust:} client endpoint strings
    opened and no connection uses now (those in use are closed when their
    last connection ends), rather than L{IDLE_CLOSE} seconds later: for a
    test that must leave the reactor clean, or a program that is done
    connecting.  The next connection opens its store again.

    @param reactor: the global reactor by default.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    assert reactor is not None
    return sharedAuthenticators(reactor).closeAll()


_registries: WeakKeyDictionary[Any, SharedAuthenticators] = WeakKeyDictionary()


def sharedAuthenticators(reactor: IReactorTime) -> SharedAuthenticators:
    """
    The L{SharedAuthenticators} of C{reactor}.
    """
    registry = _registries.get(reactor)
    if registry is None:
        registry = _registries[reactor] = SharedAuthenticators(reactor)
    return registry


@implementer(IStreamClientEndpoint)
class _StringClientEndpoint:
    """
    Connects with the authenticator this reactor shares between the client
    endpoint strings with the same identity, store and options (see
    L{SharedAuthenticators}).
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
        self._key: _Key = (
            identity.fingerprint,
            os.path.realpath(store.path),
            strict,
            expect,
            timeout,
        )

    def _open(self) -> Deferred[Authenticator]:
        return openAuthenticator(
            self._reactor,
            self._identity,
            self._store,
            strict=self._strict,
            expectedServer=self._expect,
            timeout=self._timeout,
        )

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        registry = sharedAuthenticators(self._reactor)

        def opened(
            found: tuple[_Shared, Authenticator],
        ) -> Deferred[IProtocol]:
            shared, authenticator = found
            endpoint = ClientEndpoint(authenticator, self._inner, self._pin)
            connecting = maybeDeferred(endpoint.connectHandshake, protocolFactory)

            def connected(result: tuple[IProtocol, HandshakeProtocol]) -> IProtocol:
                application, handshake = result
                handshake.whenClosed().addBoth(lambda _: registry.release(shared))
                return application

            def failed(failure: Failure) -> Failure:
                registry.release(shared)
                return failure

            return connecting.addCallbacks(connected, failed)

        return registry.acquire(self._key, self._open).addCallback(opened)


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
