"""
The receiving end of provisioning: a new instance cloning a running one with
a join token (L{clone}), a service router asking the owners for the key
(L{requestKey}), and an owner taking a join token (L{issueJoinToken}).

Whatever arrives is checked before anything is written: the key must be the
one the service proved in the handshake (and, for a clone, the one the token
names); owner registrations must be signed by that key; and decisions must be
signed by the service or one of those owners.  Everything is then written into
a fresh directory beside the target, which is renamed into place: a failure
at any step leaves nothing behind.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.filepath import FilePath
from zope.interface import implementer

from .._decision import (
    STATES,
    DecisionError,
    SignedDecision,
    Signers,
    registeredOwners,
)
from .._identity import PRIVATE_KEY_FILE, Identity, IdentityError, PeerIdentity
from .._machine import Refusal
from .._policy import ITrustPolicy, PinningPolicy
from .._protocol import IAuthenticatedTransport
from .._wire import ErrorCode
from .._wrap import DEFAULT_TIMEOUT, STORE_FILE, Authenticator
from ..control import ControlClient
from ..store import IKnownServices, KeyState, SQLiteStore
from ._commands import CollectKey, IssueJoinToken, Join, RequestKey, ServiceRecords
from ._tokens import JoinError, JoinToken

#: The organization of the throw-away identity a new instance joins with.
JOIN_ORG = "join"


def defaultInstanceName() -> str:
    """
    This host's name, made into a valid dwtrust name.
    """
    name = "".join(
        c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname().lower()
    ).strip("._-")
    return name[:63].rstrip("._-") or "instance"


def issueJoinToken(
    client: ControlClient, ttl: float, endpoint: str
) -> Deferred[JoinToken]:
    """
    Ask the service at the other end of an owner's control connection for a
    join token that lives C{ttl} seconds.

    @param endpoint: the client endpoint description a new instance dials to
        reach this service's control endpoint.
    """

    def made(answer: dict[str, Any]) -> JoinToken:
        return JoinToken(
            endpoint, client.peer.fingerprint, answer["secret"], answer["expires"]
        )

    control: amp.AMP = client.protocol
    asking: Deferred[dict[str, Any]] = control.callRemote(IssueJoinToken, ttl=ttl)
    return asking.addCallback(made)


@implementer(ITrustPolicy)
class _TheKey:
    """
    Accept the server only if it proves the key a join token names.
    """

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        if peer.fingerprint == self.fingerprint:
            return succeed(None)
        return fail(
            Refusal(
                ErrorCode.identity_changed,
                f"the join token names {self.fingerprint}, but {source}"
                f" proved {peer.fingerprint}",
            )
        )


def _refuseExisting(directory: FilePath[str], store: FilePath[str] | None) -> None:
    if directory.child(PRIVATE_KEY_FILE).exists():
        raise IdentityError(f"{directory.path} already holds an identity")
    if directory.exists() and (not directory.isdir() or directory.listdir()):
        raise IdentityError(
            f"{directory.path} must be a new or empty directory for the"
            " service's identity"
        )
    if store is None and directory.child(STORE_FILE).exists():
        raise IdentityError(f"{directory.path} already holds a trust store")


async def _connect(
    reactor: Any,
    identity: Identity,
    policy: ITrustPolicy,
    endpoint: str,
    name: str,
    timeout: float,
) -> tuple[amp.AMP, PeerIdentity]:
    try:
        dialled = clientFromString(reactor, endpoint)
    except (ValueError, KeyError, TypeError) as e:
        raise JoinError(f"bad endpoint {endpoint!r}: {e}") from None
    authenticator = Authenticator(identity, None, policy, reactor, timeout)
    protocol = await authenticator.clientEndpoint(dialled, name).connect(
        Factory.forProtocol(amp.AMP)
    )
    assert isinstance(protocol, amp.AMP)
    transport = IAuthenticatedTransport(protocol.transport)
    await transport.whenTrusted()
    return protocol, transport.peer


def clone(
    reactor: Any,
    token: JoinToken,
    directory: FilePath[str],
    store: FilePath[str] | None = None,
    instance: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[Identity]:
    """
    Start a new instance of a service from a running one (seed S6): dial
    the instance C{token} names, prove the token over a dwtrust channel with
    a throw-away key, and receive the service's identity, its owners and its
    signed decisions, which are written into C{directory} (a new or empty
    directory) and the trust store.

    @param store: the trust store to use: if it exists already (instances on
        one host sharing one), it is used as it is; otherwise (by default
        C{directory/trust.sqlite3}) it is made with the owners and decisions
        received.
    @param instance: the name the running instance logs for this one (by
        default, this host's name).
    @return: a L{Deferred} firing with the service's identity.
    @raise JoinRefused: (in the L{Deferred}) if the running instance refuses
        the token: forged, used or lapsed.
    """
    return Deferred.fromCoroutine(
        _clone(reactor, token, directory, store, instance, timeout)
    )


async def _clone(
    reactor: Any,
    token: JoinToken,
    directory: FilePath[str],
    store: FilePath[str] | None,
    instance: str | None,
    timeout: float,
) -> Identity:
    _refuseExisting(directory, store)
    instance = instance or defaultInstanceName()
    throwaway = Identity.generate(JOIN_ORG, instance)
    protocol, peer = await _connect(
        reactor,
        throwaway,
        _TheKey(token.fingerprint),
        token.endpoint,
        token.endpoint,
        timeout,
    )
    try:
        kit = await protocol.callRemote(
            Join,
            tokenId=token.tokenId,
            proof=token.proof(peer.fingerprint, throwaway.fingerprint),
            instance=instance,
        )
        return await _install(protocol, peer, kit, directory, store, token.endpoint)
    finally:
        protocol.transport.loseConnection()  # type: ignore[union-attr]


def requestKey(
    reactor: Any,
    router: Identity,
    pins: IKnownServices,
    endpoint: str,
    address: str,
    directory: Callable[[PeerIdentity], FilePath[str]],
    instance: str | None = None,
    waiting: Callable[[PeerIdentity, str, float], object] = lambda *_: None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Deferred[Identity]:
    """
    As the service router C{router}, ask the service at C{endpoint} for its
    key (seed S7), wait for its owners' answer, and on release write the
    service's identity, owners and decisions into a new directory.

    The service's key is pinned on first use under C{address} in C{pins},
    as for any service dialled.

    @param directory: where to write, given the service's identity.
    @param waiting: called with the service, the request's id and when it
        lapses, once the request waits for the owners.
    @raise KeyRequestRefused: (in the L{Deferred}) if an owner withheld the
        key, or the request lapsed or was refused.
    """
    return Deferred.fromCoroutine(
        _requestKey(
            reactor,
            router,
            pins,
            endpoint,
            address,
            directory,
            instance,
            waiting,
            timeout,
        )
    )


async def _requestKey(
    reactor: Any,
    router: Identity,
    pins: IKnownServices,
    endpoint: str,
    address: str,
    directory: Callable[[PeerIdentity], FilePath[str]],
    instance: str | None,
    waiting: Callable[[PeerIdentity, str, float], object],
    timeout: float,
) -> Identity:
    protocol, peer = await _connect(
        reactor, router, PinningPolicy(pins), endpoint, address, timeout
    )
    try:
        target = directory(peer)
        _refuseExisting(target, None)
        answer = await protocol.callRemote(
            RequestKey, instance=instance or defaultInstanceName()
        )
        waiting(peer, answer["requestId"], answer["expires"])
        kit = await protocol.callRemote(CollectKey)
        return await _install(protocol, peer, kit, target, None, address)
    finally:
        protocol.transport.loseConnection()  # type: ignore[union-attr]


async def _records(protocol: amp.AMP) -> list[bytes]:
    decisions: list[bytes] = []
    while True:
        page = await protocol.callRemote(ServiceRecords, offset=len(decisions))
        decisions.extend(page["decisions"])
        if not page["decisions"] or len(decisions) >= page["total"]:
            return decisions


def _identityOf(peer: PeerIdentity, kit: dict[str, Any]) -> Identity:
    try:
        key = serialization.load_ssh_private_key(kit["privateKey"], None)
        identity = Identity.fromPrivateKey(kit["org"], kit["service"], key)  # type: ignore[arg-type]
    except (ValueError, TypeError, IdentityError) as e:
        raise JoinError(f"the service sent a key that cannot be used: {e}") from None
    if identity.fingerprint != peer.fingerprint or identity.name != peer.name:
        raise JoinError(
            f"the service sent {identity.name} {identity.fingerprint}, not the"
            f" key it proved ({peer.name} {peer.fingerprint})"
        )
    return identity


async def _install(
    protocol: amp.AMP,
    peer: PeerIdentity,
    kit: dict[str, Any],
    directory: FilePath[str],
    store: FilePath[str] | None,
    source: str,
) -> Identity:
    identity = _identityOf(peer, kit)
    # Each registration must be the service's own signed word.
    registrations = [r for r in kit["owners"] if registeredOwners(identity, [r])]
    owners = registeredOwners(identity, registrations)
    decisions = await _records(protocol)
    signers = Signers(owners)
    signers.add(identity.publicKey)
    verified: list[SignedDecision] = []
    for encoded in decisions:
        try:
            decision = SignedDecision.decode(encoded)
            signers.verify(
                decision,
                identity.name,
                None if decision.version == 1 else identity.fingerprint,
            )
            if decision.state not in STATES:
                raise DecisionError(f"a {decision.state} decision is not a record")
        except DecisionError:
            continue
        verified.append(decision)
    # Everything checked: write it all beside the target, then move it in.
    _refuseExisting(directory, store)
    parent = directory.parent()
    if not parent.exists():
        parent.makedirs()
    staging = FilePath(
        tempfile.mkdtemp(prefix=f".{directory.basename()}.", dir=parent.path)
    )
    try:
        identity.save(staging)
        sharing = store is not None and store.exists()
        if not sharing:
            records = await SQLiteStore.open(staging.child(STORE_FILE), time.time)
            try:
                for registration in registrations:
                    await records.addOwner(
                        SignedDecision.decode(registration).fingerprint, registration
                    )
                for decision in verified:
                    await records.record(
                        decision.subject(),
                        KeyState(decision.state),
                        f"copied from {source}",
                        decision.signer,
                        decision.encode(),
                        decision.sequence,
                        peer.fingerprint,
                    )
            finally:
                await records.close()
            if store is not None:
                os.replace(staging.child(STORE_FILE).path, store.path)
        if directory.exists():
            directory.remove()
        os.rename(staging.path, directory.path)
    except BaseException:
        if staging.exists():
            staging.remove()
        raise
    return identity
