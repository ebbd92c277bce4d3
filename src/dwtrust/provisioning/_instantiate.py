"""
Microclients instantiate microservers (seed S8): making new services whose
first connections need no approval.

A microclient (a command-line tool, say, with an identity of its own)
instantiates a microserver with L{instantiate}, or with::

    dwtrust instantiate --identity CLIENT_DIR --server-identity NEW_SERVER_DIR \\
        --org ORG --service NAME

The new server's identity is made with the client's key already approved in
its trust store, and the server's key is installed in the client's known
services, so their first connection needs no approval in either direction.
Every other key is still subject to trust on first use.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from .._decision import SignedDecision
from .._identity import (
    IDENTITY_FILE,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Identity,
    IdentityError,
    PeerIdentity,
    validateName,
)
from .._wrap import STORE_FILE
from ..store import KeyState, SQLiteStore

__all__ = [
    "INSTANTIATED_BY",
    "SERVICE_PIN_PREFIX",
    "instantiate",
    "servicePin",
]

#: Who the client's approval is recorded as decided by, and the reason in its
#: signed decision.
INSTANTIATED_BY = "instantiate"
_REASON = "installed by instantiate"

#: The prefix of the pseudo-address under which a client pins a server it
#: instantiated: it does not know the server's address yet.
SERVICE_PIN_PREFIX = "service:"

#: The files of a SQLite store besides the store itself.
_STORE_SIDE_FILES = ("-wal", "-shm", "-journal")


def servicePin(org: str, service: str) -> str:
    """
    The pseudo-address C{service:ORG/SERVICE} under which L{instantiate} pins
    the new server's key in the client's known services.  A client's
    L{dwtrust.PinningPolicy} treats a server whose C{org/service} is pinned
    with the same key, under any name, as known; C{dwtrust forget --identity
    CLIENT_DIR service:ORG/SERVICE} removes the pin.
    """
    return f"{SERVICE_PIN_PREFIX}{org}/{service}"


def instantiate(
    client: Identity,
    clientStore: FilePath[str],
    serverDirectory: FilePath[str],
    org: str,
    service: str,
    algorithm: str = "ed25519",
    now: Callable[[], float] = time.time,
) -> Deferred[Identity]:
    """
    Instantiate a microserver for the microclient C{client}.

    Makes a new identity C{org}/C{service} in C{serverDirectory}; records
    C{client}'s key as approved in the new server's trust store
    (C{serverDirectory/trust.sqlite3}), with a decision signed by the new
    server's own key (which every service trusts); and pins the server's key
    in C{clientStore} under the pseudo-address L{servicePin}C{(org,
    service)}.  The two can then connect, the first time, with no approval
    in either direction, even with the client in strict mode.

    If any step fails, what it had made in C{serverDirectory} is removed.

    @param client: the microclient's identity.
    @param clientStore: the microclient's SQLite store (created if need be).
    @param serverDirectory: where the new server's identity goes; it must not
        hold an identity or a trust store yet.
    @param algorithm: the new server's key algorithm, as C{dwtrust keygen
        --algorithm} takes it.
    @param now: the clock, for the decision's time.
    @return: a L{Deferred} that fires with the new server's identity.
    @raise IdentityError: (in the L{Deferred}) if C{serverDirectory} already
        holds an identity or a trust store, or if a name or the algorithm is
        not allowed.
    """
    return Deferred.fromCoroutine(
        _instantiate(client, clientStore, serverDirectory, org, service, algorithm, now)
    )


async def _instantiate(
    client: Identity,
    clientStore: FilePath[str],
    serverDirectory: FilePath[str],
    org: str,
    service: str,
    algorithm: str,
    now: Callable[[], float],
) -> Identity:
    validateName("organization", org)
    validateName("service", service)
    storePath = serverDirectory.child(STORE_FILE)
    if serverDirectory.child(PRIVATE_KEY_FILE).exists():
        raise IdentityError(f"{serverDirectory.path} already holds an identity")
    if storePath.exists():
        raise IdentityError(
            f"{serverDirectory.path} already holds a trust store; a new"
            " server's directory must not"
        )
    if serverDirectory.exists() and not serverDirectory.isdir():
        raise IdentityError(f"{serverDirectory.path} is not a directory")
    # Every check that can fail on the arguments comes before anything is
    # written: generating checks the algorithm.
    server = Identity.generate(org, service, algorithm)
    created = not serverDirectory.exists()
    try:
        server.save(serverDirectory)
        serverStore = await SQLiteStore.open(storePath, now)
        try:
            clientPeer = PeerIdentity(client.org, client.service, client.publicKey)
            decision = SignedDecision.make(
                server,
                server.name,
                clientPeer,
                KeyState.approved.value,
                now(),
                _REASON,
                server.fingerprint,
                1,
            )
            await serverStore.record(
                clientPeer,
                KeyState.approved,
                INSTANTIATED_BY,
                INSTANTIATED_BY,
                decision.encode(),
                decision.sequence,
                server.fingerprint,
            )
        finally:
            await serverStore.close()
        pins = await SQLiteStore.open(clientStore, now)
        try:
            await pins.pin(
                servicePin(org, service),
                PeerIdentity(server.org, server.service, server.publicKey),
            )
        finally:
            await pins.close()
    except BaseException:
        _removeServer(serverDirectory, created)
        raise
    return server


def _removeServer(directory: FilePath[str], created: bool) -> None:
    """
    Remove what L{instantiate} made in C{directory}: all of it if it created
    the directory, its identity and store files otherwise.
    """
    if created:
        if directory.exists():
            directory.remove()
        return
    names = [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, IDENTITY_FILE, STORE_FILE]
    names += [STORE_FILE + suffix for suffix in _STORE_SIDE_FILES]
    for name in names:
        child = directory.child(name)
        if child.exists():
            child.remove()
