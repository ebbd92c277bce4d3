"""
Provisioning: C{dwtrust instantiate}, C{clone} and C{request-key}.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.python import usage
from twisted.python.filepath import FilePath

from .._identity import SHORT_NAMES, Identity, PeerIdentity
from .._wrap import DEFAULT_TIMEOUT, STORE_FILE
from ..provisioning import (
    INSTANTIATED_BY,
    JoinError,
    JoinToken,
    clone,
    instantiate,
    readJoinToken,
    requestKey,
    servicePin,
)
from ..store import SQLiteStore
from ._common import (
    OK,
    CommandError,
    _address,
    _AddressOptions,
    _IdentityOptions,
    _positive,
    _printable,
    isoTime,
)
from ._keys import _printIdentity


class InstantiateOptions(_IdentityOptions):
    synopsis = "[options] --server-identity NEW_SERVER_DIR --org ORG --service NAME"
    longdesc = (
        "Instantiate a microserver for this microclient: create the server's "
        "identity in NEW_SERVER_DIR with the client's public key approved in "
        "its trust store, and install the server's public key in the client's "
        "known services (as service:ORG/NAME). Their first connection then "
        "needs no approval in either direction."
    )
    optParameters = [
        *_IdentityOptions.optParameters,
        ["server-identity", None, None, "The new server's identity directory."],
        ["org", "o", None, "The new server's organization name."],
        ["service", "s", None, "The new server's service name."],
        [
            "algorithm",
            "a",
            "ed25519",
            "The new server's key: one of " + ", ".join(sorted(SHORT_NAMES)) + ".",
        ],
        ["store", None, None, f"The client's trust store [IDENTITY/{STORE_FILE}]."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        for name in ["server-identity", "org", "service"]:
            if not self[name]:
                raise usage.UsageError(f"--{name} is required")
        self["server-identity"] = os.path.expanduser(self["server-identity"])

    @property
    def serverDirectory(self) -> FilePath[str]:
        return FilePath(self["server-identity"])

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


class CloneOptions(_IdentityOptions):
    synopsis = "[options] (--join - | --join-file PATH)"
    longdesc = (
        "Become a new instance of a service: dial the running instance a join"
        " token names, redeem the token, and receive the service's key (0600),"
        " its owners and its signed decisions into NEW_DIR, a new or empty"
        " directory. Nothing is written unless all of it arrives and checks out."
    )
    optParameters = [
        *_IdentityOptions.optParameters,
        [
            "join",
            "j",
            None,
            "- to read the join token from standard input (never the token"
            " itself: other local users can read a command line).",
        ],
        [
            "join-file",
            None,
            None,
            "Read the join token from this file, which only you may read (chmod 600).",
        ],
        [
            "store",
            None,
            None,
            "The trust store: one that exists (shared by the instances on this"
            " host) is used as it is; otherwise it is made with what arrives"
            f" [IDENTITY/{STORE_FILE}].",
        ],
        ["instance", None, None, "This instance's name in the service's audit log."],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "Seconds allowed for the handshake.",
            _positive,
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["join"] is None and self["join-file"] is None:
            raise usage.UsageError("give --join - or --join-file PATH")
        # Refused before anything is read, dialled or written.
        try:
            token = readJoinToken(self["join"], self["join-file"], sys.stdin)
        except JoinError as e:
            raise usage.UsageError(str(e)) from None
        assert token is not None
        self.token = token
        if self["store"]:
            self["store"] = os.path.expanduser(self["store"])


class RequestKeyOptions(_AddressOptions):
    synopsis = "[options] HOST:PORT"
    longdesc = (
        "As a service router, ask the service whose control endpoint is at"
        " HOST:PORT for its key. Its owners are asked; the command waits for"
        " their answer, and on release writes the service's identity into a"
        " new directory, from which twistd dwtrust can serve as the service."
    )
    optParameters = [
        *_AddressOptions.optParameters,
        [
            "into",
            None,
            None,
            "Where to write the service's identity [ROUTER_DIR/services/ORG/SERVICE].",
        ],
        ["instance", None, None, "This router's name in the service's audit log."],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "Seconds allowed for the handshake.",
            _positive,
        ],
    ]


async def _clone(reactor: Any, options: CloneOptions, out: TextIO) -> int:
    token = JoinToken.parse(options.token)
    store = FilePath(options["store"]) if options["store"] else None
    identity = await clone(
        reactor,
        token,
        options.directory,
        store,
        options["instance"],
        options["timeout"],
    )
    out.write(
        f"joined {identity.name} ({identity.fingerprint}) from {token.endpoint}:"
        f" its identity is in {options.directory.path}, trust store"
        f" {(store or options.directory.child(STORE_FILE)).path}\n"
    )
    return OK


async def _requestKey(
    reactor: Any, options: RequestKeyOptions, out: TextIO, err: TextIO
) -> int:
    router = Identity.load(options.directory)
    description, pinName = _address(options["address"])
    try:
        clientFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(f"bad address {options['address']!r}: {e}") from None

    def into(peer: PeerIdentity) -> FilePath[str]:
        if options["into"]:
            return FilePath(os.path.expanduser(options["into"]))
        return options.directory.child("services").child(peer.org).child(peer.service)

    def waiting(peer: PeerIdentity, requestId: str, expires: float) -> None:
        err.write(
            _printable(
                f"dwtrust: asked {peer.name}'s owners for its key (request"
                f" {requestId}); waiting for them until {isoTime(expires)}"
            )
            + "\n"
        )
        err.flush()

    pins = await SQLiteStore.open(options.store)
    try:
        service = await requestKey(
            reactor,
            router,
            pins,
            description,
            pinName,
            into,
            options["instance"],
            waiting,
            options["timeout"],
        )
    except ConnectError as e:
        raise CommandError(f"cannot reach {options['address']}: {e}") from None
    finally:
        await pins.close()
    where = into(PeerIdentity(service.org, service.service, service.publicKey))
    out.write(
        f"an owner released {service.name}'s key ({service.fingerprint}): its"
        f" identity is in {where.path}\n"
    )
    return OK


async def _instantiate(options: InstantiateOptions, out: TextIO) -> int:
    client = Identity.load(options.directory)
    server = await instantiate(
        client,
        options.store,
        options.serverDirectory,
        options["org"],
        options["service"],
        options["algorithm"],
    )
    out.write(f"created the microserver identity in {options.serverDirectory.path}\n")
    _printIdentity(server, False, out)
    out.write(
        f"approved {client.name} ({client.fingerprint}) in"
        f" {options.serverDirectory.child(STORE_FILE).path}: decided by"
        f" {INSTANTIATED_BY}, signed with {server.name}'s own key\n"
        f"pinned {server.name} ({server.fingerprint}) as"
        f" {servicePin(server.org, server.service)} in {options.store.path}\n"
    )
    return OK
