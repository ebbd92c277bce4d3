"""
The C{dwtrust} command.

    dwtrust keygen --identity DIR --org ORG --service NAME [--algorithm ALG]
    dwtrust show --identity DIR [--json]
    dwtrust connect --identity DIR [--strict] [--expect ORG/NAME] HOST:PORT
    dwtrust forget --identity DIR HOST:PORT
    dwtrust instantiate --identity CLIENT_DIR --server-identity NEW_SERVER_DIR
        --org ORG --service NAME [--algorithm ALG] [--store CLIENT_STORE]

An owner's commands, over a service's control endpoint:

    dwtrust pending --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust approve --control ENDPOINT --identity OWNER_DIR [--reason TEXT] ID
    dwtrust deny --control ENDPOINT --identity OWNER_DIR [--reason TEXT] ID
    dwtrust block --control ENDPOINT --identity OWNER_DIR ID_OR_FINGERPRINT
    dwtrust revoke --control ENDPOINT --identity OWNER_DIR FINGERPRINT
    dwtrust peers --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust watch --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust join-token --control ENDPOINT --identity OWNER_DIR [--ttl 10m]

Provisioning (see L{dwtrust.provisioning}):

    dwtrust clone --join TOKEN --identity NEW_DIR [--store PATH]
    dwtrust request-key --identity ROUTER_DIR [--into DIR] HOST:PORT
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IReactorCore,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.internet.task import react
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from ._decision import DecisionError, SignedDecision, readOwnerKey, registerOwner
from ._identity import SHORT_NAMES, Identity, IdentityError, PeerIdentity
from ._policy import PinningPolicy
from ._protocol import HandshakeFailed
from ._sidecar import remoteDescription
from ._wire import EXPLANATIONS, ErrorCode
from ._wrap import DEFAULT_TIMEOUT, STORE_FILE, Authenticator
from .control import (
    ControlClient,
    ControlFailed,
    ControlMessage,
    DecisionRefused,
    Listing,
    openControl,
    signDecision,
)
from .control._protocol import NotAnOwner, exactly, matches, normalizePrefix
from .provisioning import (
    INSTANTIATED_BY,
    JoinError,
    JoinRefused,
    JoinToken,
    KeyRequestRefused,
    clone,
    instantiate,
    issueJoinToken,
    requestKey,
    servicePin,
)
from .store import SQLiteStore, StoreError, migrateStore
from .store._open import redacted

DEFAULT_IDENTITY = os.path.join("~", ".dwtrust")

#: Exit statuses.
OK, FAILED, USAGE, REFUSED = 0, 1, 2, 3


class CommandError(Exception):
    """
    A command could not do its job; the message says why.
    """


class _IdentityOptions(usage.Options):
    optParameters: list[list[Any]] = [
        ["identity", "i", DEFAULT_IDENTITY, "The identity directory."],
    ]

    def postOptions(self) -> None:
        self["identity"] = os.path.expanduser(self["identity"])

    @property
    def directory(self) -> FilePath[str]:
        return FilePath(self["identity"])


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


class _AddressOptions(_IdentityOptions):
    optParameters = [
        *_IdentityOptions.optParameters,
        ["store", None, None, f"The SQLite trust store [IDENTITY/{STORE_FILE}]."],
    ]

    def parseArgs(self, address: str) -> None:  # type: ignore[override]
        self["address"] = address

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


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


class InstantiateOptions(_IdentityOptions):
    synopsis = (
        "--identity CLIENT_DIR --server-identity NEW_SERVER_DIR --org ORG"
        " --service NAME [--algorithm ALG] [--store CLIENT_STORE]"
    )
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


class AddOwnerOptions(_IdentityOptions):
    synopsis = "--identity SERVICE_DIR OWNER_PUBKEY_FILE"
    longdesc = (
        "Register an owner in a service's trust store, signed with the "
        "service's own key: the local, deliberate way to recover from lost "
        "owner keys. Run it where the service's identity directory is; the "
        "daemon reads registered owners when it starts."
    )
    optParameters = [
        *_IdentityOptions.optParameters,
        ["store", None, None, f"The SQLite trust store [IDENTITY/{STORE_FILE}]."],
    ]

    def parseArgs(self, ownerKey: str) -> None:  # type: ignore[override]
        self["owner-key"] = ownerKey

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


# The owners' commands: pending, peers, approve, deny, block, revoke, watch.

#: The control endpoint owners reach by default.
DEFAULT_CONTROL = "unix:" + os.path.join("~", ".dwtrust", "control.sock")
#: The longest reason an owner may give.
MAX_REASON = 1000
#: The width of the longest control-message kind.
_KIND_WIDTH = len("approval_requested")


class _ControlOptions(_IdentityOptions):
    optFlags = [["json", None, "Print JSON."]]
    optParameters = [
        *_IdentityOptions.optParameters,
        [
            "control",
            "c",
            DEFAULT_CONTROL,
            "The service's control endpoint: unix:PATH, a socket's path,"
            " tcp:host=HOST:port=PORT or HOST:PORT.",
        ],
        ["store", None, None, f"The owner's pin store [IDENTITY/{STORE_FILE}]."],
        ["timeout", "t", DEFAULT_TIMEOUT, "Seconds allowed for the handshake.", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["control"], self["address"] = controlAddress(self["control"])

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


class PendingOptions(_ControlOptions):
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--json]"
    longdesc = "List the requests waiting for an owner's decision."


class PeersOptions(_ControlOptions):
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--json]"
    longdesc = "List the keys the service has a decision about."


class WatchOptions(_ControlOptions):
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--json]"
    longdesc = (
        "Print the service's control messages as they arrive, one a line, until"
        " the connection closes or Ctrl-C."
    )


class _DecideOptions(_ControlOptions):
    #: The decision the command signs.
    state = ""
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--reason TEXT] ID"
    optParameters = [
        *_ControlOptions.optParameters,
        ["reason", "r", "", "Why, in your words; stored with the decision."],
    ]

    def parseArgs(self, target: str) -> None:  # type: ignore[override]
        if not normalizePrefix(target):
            raise usage.UsageError("give a request ID or a fingerprint")
        self["target"] = target

    def postOptions(self) -> None:
        super().postOptions()
        if len(self["reason"]) > MAX_REASON:
            raise usage.UsageError(f"--reason is limited to {MAX_REASON} characters")


class ApproveOptions(_DecideOptions):
    state = "approved"
    longdesc = (
        "Approve a pending request (or a decided key), given by a unique prefix"
        " of its request ID or fingerprint. The decision is signed with your key."
    )


class DenyOptions(_DecideOptions):
    state = "denied"
    longdesc = (
        "Deny a pending request (or a decided key), given by a unique prefix of"
        " its request ID or fingerprint. The decision is signed with your key."
    )


class BlockOptions(_DecideOptions):
    state = "blocked"
    synopsis = (
        "--control ENDPOINT --identity OWNER_DIR [--reason TEXT] ID_OR_FINGERPRINT"
    )
    longdesc = (
        "Block a key, so that it is refused and raises no more requests. Give a"
        " unique prefix of its request ID or fingerprint."
    )


class RevokeOptions(_DecideOptions):
    state = "revoked"
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--reason TEXT] FINGERPRINT"
    longdesc = (
        "Revoke a key the service has a decision about, given by a unique prefix"
        " of its fingerprint: its open sessions close, and it is refused from"
        " now on."
    )


class MigrateOptions(usage.Options):
    synopsis = "--store PATH_OR_URL"
    longdesc = (
        "Create or upgrade the schema of a trust store: a SQLite file, or a "
        "postgresql:// URL. Prints the schema version before and after."
    )
    optParameters: list[list[Any]] = [
        ["store", None, None, "The trust store: a SQLite file or a postgresql:// URL."],
    ]

    def postOptions(self) -> None:
        if not self["store"]:
            raise usage.UsageError("--store is required")


def migrate(options: MigrateOptions, out: TextIO, err: TextIO) -> int:
    """
    C{dwtrust migrate}: bring a store's schema up to date.
    """
    where = redacted(options["store"])
    try:
        before, after = migrateStore(options["store"])
    except StoreError as e:
        err.write(f"dwtrust: {e}\n")
        return FAILED
    if before == after:
        out.write(f"{where}: schema version {after}, up to date\n")
    else:
        out.write(f"{where}: schema version {before} -> {after}\n")
    return OK


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), 0)
    number = float(text[:-1] if scale else text)
    if not number > 0:
        raise ValueError(f"{text} is not a positive duration")
    return number * (scale or 1)


_duration.coerceDoc = "Seconds, or a number with s, m or h."  # type: ignore[attr-defined]


class JoinTokenOptions(_ControlOptions):
    synopsis = "--control ENDPOINT --identity OWNER_DIR [--ttl 10m] [--via ENDPOINT]"
    longdesc = (
        "Take a one-time join token from a running instance, as one of its"
        " owners. A new instance started with it (twistd dwtrust --join TOKEN,"
        " or dwtrust clone --join TOKEN) receives the service's key, owners and"
        " decisions from that instance. The token alone goes to standard"
        " output; keep it secret, it is a key to the key."
    )
    optParameters = [
        *_ControlOptions.optParameters,
        ["ttl", None, 600.0, "How long the token lives (at most 24h).", _duration],
        [
            "via",
            None,
            None,
            "The endpoint a new instance dials for this instance's control"
            " endpoint, if not the one given with --control (HOST:PORT or an"
            " endpoint description).",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        self["via"] = controlAddress(self["via"])[0] if self["via"] else self["control"]


class CloneOptions(_IdentityOptions):
    synopsis = "--join TOKEN --identity NEW_DIR [--store PATH] [--instance NAME]"
    longdesc = (
        "Become a new instance of a service: dial the running instance a join"
        " token names, redeem the token, and receive the service's key (0600),"
        " its owners and its signed decisions into NEW_DIR, a new or empty"
        " directory. Nothing is written unless all of it arrives and checks out."
    )
    optParameters = [
        *_IdentityOptions.optParameters,
        ["join", "j", None, "The join token, or - to read it from standard input."],
        [
            "store",
            None,
            None,
            "The trust store: one that exists (shared by the instances on this"
            " host) is used as it is; otherwise it is made with what arrives"
            f" [IDENTITY/{STORE_FILE}].",
        ],
        ["instance", None, None, "This instance's name in the service's audit log."],
        ["timeout", "t", DEFAULT_TIMEOUT, "Seconds allowed for the handshake.", float],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["join"]:
            raise usage.UsageError("--join is required")
        if self["store"]:
            self["store"] = os.path.expanduser(self["store"])


class RequestKeyOptions(_AddressOptions):
    synopsis = "--identity ROUTER_DIR [--into DIR] [--instance NAME] HOST:PORT"
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
        ["timeout", "t", DEFAULT_TIMEOUT, "Seconds allowed for the handshake.", float],
    ]


class Options(usage.Options):
    synopsis = "COMMAND [options]"
    subCommands = [
        ["keygen", None, KeygenOptions, "Create an identity."],
        ["show", None, ShowOptions, "Show an identity."],
        ["connect", None, ConnectOptions, "Connect to a dwtrust service."],
        ["forget", None, ForgetOptions, "Forget a pinned server key."],
        ["pending", None, PendingOptions, "List the requests owners must decide."],
        ["approve", None, ApproveOptions, "Approve a key (signed, as an owner)."],
        ["deny", None, DenyOptions, "Deny a key (signed, as an owner)."],
        ["block", None, BlockOptions, "Block a key, so it raises no requests."],
        ["revoke", None, RevokeOptions, "Revoke an approved key."],
        ["peers", None, PeersOptions, "List the keys with a decision."],
        ["watch", None, WatchOptions, "Print control messages as they arrive."],
        ["add-owner", None, AddOwnerOptions, "Register an owner (break-glass)."],
        ["join-token", None, JoinTokenOptions, "Take a token for a new instance."],
        ["clone", None, CloneOptions, "Become a new instance, with a join token."],
        [
            "request-key",
            None,
            RequestKeyOptions,
            "Ask a service's owners for its key (routers).",
        ],
        ["migrate", None, MigrateOptions, "Create or upgrade a trust store's schema."],
        [
            "instantiate",
            None,
            InstantiateOptions,
            "Create a microserver that trusts this client, and pin it.",
        ],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command")


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


def _address(address: str) -> tuple[str, str]:
    """
    The endpoint description and pin name for C{HOST:PORT} (or an endpoint
    description, used as it is).
    """
    return remoteDescription(address), address


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


def controlAddress(text: str) -> tuple[str, str]:
    """
    The endpoint description and pin name for a C{--control} value:
    C{unix:PATH} (C{~} expanded), a socket's path, C{HOST:PORT}, or any client
    endpoint description.
    """
    text = text.strip()
    if text.startswith("unix:"):
        path, sep, rest = text[len("unix:") :].partition(":")
        keyword = ""
        if path.startswith("path="):
            keyword, path = "path=", path[len("path=") :]
        description = f"unix:{keyword}{os.path.expanduser(path)}{sep}{rest}"
        return description, description
    if text.startswith(("/", "~", "./", "../")):
        path = os.path.expanduser(text).replace(":", "\\:")
        return f"unix:{path}", f"unix:{path}"
    return _address(text)


def _printable(text: object) -> str:
    """
    C{text} with control characters escaped, so that nothing a peer or
    another owner chose can move a terminal's cursor or hide a line.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


def isoTime(when: float) -> str:
    """
    A POSIX time as ISO 8601 UTC, to the second; C{-} for none.
    """
    if not when:
        return "-"
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def formatTable(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """
    Aligned columns, two spaces apart, with no trailing space.
    """
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) for c, w in zip(cells, widths, strict=True)
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _name(entry: dict[str, Any]) -> str:
    return _printable(f"{entry.get('org', '')}/{entry.get('service', '')}")


def _notShown(listing: Listing) -> list[str]:
    if listing.omitted:
        return [f"... and {listing.omitted} more not shown"]
    return []


PENDING_HEADERS = (
    "ID",
    "FINGERPRINT",
    "ORG/SERVICE",
    "ALGORITHM",
    "FROM",
    "FIRST SEEN",
    "ATTEMPTS",
)


def formatPending(listing: Listing, service: str) -> str:
    """
    The pending requests as aligned text, each followed by a line for every
    other key already known for its org/service, so that an owner sees an
    identity change before approving it.
    """
    if not listing.entries:
        return f"no pending requests for {_printable(service)}\n"
    rows = [
        [
            _printable(e.get("id", "")),
            _printable(e.get("fingerprint", "")),
            _name(e),
            _printable(e.get("algorithm", "")),
            _printable(e.get("source", "")) or "-",
            isoTime(e.get("firstSeen", 0)),
            str(e.get("attempts", 0)),
        ]
        for e in listing.entries
    ]
    header, *lines = formatTable(PENDING_HEADERS, rows)
    indent = " " * (max(len("ID"), *(len(r[0]) for r in rows)) + 2)
    output = [header]
    for entry, line in zip(listing.entries, lines, strict=True):
        output.append(line)
        if entry.get("kind") == "key_request":
            output.append(
                f"{indent}asks for {_printable(service)}'s private key, to serve as"
                f" it (router {_printable(entry.get('instance', ''))}): approve"
                " releases the key to it alone, deny withholds it"
            )
        for known in entry.get("knownKeys", []):
            output.append(
                f"{indent}{_name(entry)} already has"
                f" {_printable(known.get('state', ''))} key"
                f" {_printable(known.get('fingerprint', ''))}"
            )
        if entry.get("knownKeysOmitted"):
            output.append(
                f"{indent}{_name(entry)} has {entry['knownKeysOmitted']} more"
                " known keys"
            )
    return "\n".join([*output, *_notShown(listing)]) + "\n"


PEERS_HEADERS = (
    "FINGERPRINT",
    "ORG/SERVICE",
    "ALGORITHM",
    "STATE",
    "DECIDED BY",
    "LAST SEEN",
    "ATTEMPTS",
    "FROM",
)


def formatPeers(listing: Listing, service: str) -> str:
    """
    The keys with a decision, as aligned text.
    """
    if not listing.entries:
        return f"no keys with a decision for {_printable(service)}\n"
    rows = [
        [
            _printable(e.get("fingerprint", "")),
            _name(e),
            _printable(e.get("algorithm", "")),
            _printable(e.get("state", "")),
            _printable(e.get("decidedBy", "")) or "-",
            isoTime(e.get("lastSeen", 0)),
            str(e.get("attempts", 0)),
            _printable(e.get("source", "")) or "-",
        ]
        for e in listing.entries
    ]
    return "\n".join([*formatTable(PEERS_HEADERS, rows), *_notShown(listing)]) + "\n"


def formatMessage(message: ControlMessage) -> str:
    """
    One control message as one line: when, what, about whom, from where, and
    the details.
    """
    name = f"{message.org}/{message.peerService}" if message.org else "-"
    details = []
    if message.requestId:
        details.append(f"request {message.requestId}")
    if message.state:
        details.append(
            f"{message.state} by {message.decidedBy}"
            if message.decidedBy
            else message.state
        )
    if message.attempts > 1:
        details.append(f"{message.attempts} attempts")
    if message.knownKeys:
        details.append("known keys: " + ", ".join(message.knownKeys))
    if message.reason:
        details.append(message.reason)
    cells = [
        isoTime(message.time),
        message.kind.ljust(_KIND_WIDTH),
        name,
        message.fingerprint or "-",
        message.source or "-",
        "; ".join(details),
    ]
    return "  ".join(_printable(cell) for cell in cells).rstrip()


class NoMatch(CommandError):
    """
    No entry matches a prefix.
    """


def resolve(
    prefix: str, entries: Sequence[dict[str, Any]], what: str
) -> dict[str, Any]:
    """
    The one entry whose request ID or fingerprint C{prefix} begins (with or
    without C{SHA256:}); an entry whose ID or fingerprint it is exactly wins
    over others it merely begins.

    @param what: what the entries are, for the error message.
    @raise NoMatch: if none matches.
    @raise CommandError: if several do, listing them.
    """
    found = [e for e in entries if matches(prefix, e)]
    exact = [e for e in found if exactly(prefix, e)]
    if len(exact) == 1:
        return exact[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NoMatch(f"no {what} matches {_printable(prefix)!r}")
    shown = found[:20]
    candidates = "\n".join(
        "  "
        + "  ".join(
            _printable(part)
            for part in [e.get("id", ""), e.get("fingerprint", ""), _name(e)]
            if part
        )
        for e in shown
    )
    more = f"\n  ... and {len(found) - len(shown)} more" if len(found) > 20 else ""
    raise CommandError(
        f"{_printable(prefix)!r} matches {len(found)} {what}s; give more of it:\n"
        f"{candidates}{more}"
    )


async def _target(client: ControlClient, options: _DecideOptions) -> dict[str, Any]:
    """
    The entry a decision command's argument names.
    """
    target = options["target"]
    if options.state == "revoked":
        try:
            return resolve(target, (await client.peers(target)).entries, "decided key")
        except NoMatch:
            if (await client.pending(target)).entries:
                raise CommandError(
                    f"{_printable(target)!r} is a pending request, with no"
                    " decision to revoke: deny or block it"
                ) from None
            raise
    try:
        return resolve(target, (await client.pending(target)).entries, "request")
    except NoMatch:
        pass
    try:
        return resolve(target, (await client.peers(target)).entries, "key")
    except NoMatch:
        raise NoMatch(
            f"no pending request or known key matches {_printable(target)!r}"
        ) from None


def decisionJSON(decision: SignedDecision) -> dict[str, Any]:
    """
    A signed decision's facts, for C{--json}.
    """
    return {
        "service": decision.service,
        "state": decision.state,
        "fingerprint": decision.fingerprint,
        "org": decision.org,
        "peerService": decision.subjectService,
        "algorithm": decision.algorithm,
        "decidedAt": decision.decidedAt,
        "reason": decision.reason,
        "signer": decision.signer,
        "signature": base64.b64encode(decision.signature).decode("ascii"),
    }


def describeDecision(decision: SignedDecision, entry: dict[str, Any]) -> str:
    """
    What a decision command did, in one line.
    """
    request = f" (request {entry['id']})" if entry.get("id") else ""
    if decision.state in ("release", "withhold"):
        done = "released" if decision.state == "release" else "withheld"
        return _printable(
            f"{done} {decision.service}'s key"
            f" {'to' if decision.state == 'release' else 'from'}"
            f" {decision.org}/{decision.subjectService} {decision.fingerprint}"
            f"{request}, signed by {decision.signer}"
        )
    return _printable(
        f"{decision.state} {decision.org}/{decision.subjectService}"
        f" {decision.fingerprint}{request} for {decision.service},"
        f" signed by {decision.signer}"
    )


def listingJSON(kind: str, listing: Listing, service: str) -> dict[str, Any]:
    """
    What C{pending --json} and C{peers --json} print: the service's name, how
    many entries there are in all and how many are left out, and the entries
    (under C{kind}).
    """
    return {
        "service": service,
        "total": listing.total,
        "omitted": listing.omitted,
        kind: list(listing.entries),
    }


def _writeJSON(out: TextIO, value: Any) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


async def _decideCommand(
    client: ControlClient, identity: Identity, options: _DecideOptions, out: TextIO
) -> int:
    entry = await _target(client, options)
    state = options.state
    if entry.get("kind") == "key_request":
        answers = {"approved": "release", "denied": "withhold"}
        if state not in answers:
            raise CommandError(
                f"{_printable(options['target'])!r} is a key request: approve"
                " (release the key) or deny (withhold it)"
            )
        state = answers[state]
    elif entry.get("state") == options.state:
        out.write(
            _printable(
                f"{entry['org']}/{entry['service']} {entry['fingerprint']} is"
                f" already {options.state}"
            )
            + "\n"
        )
        return OK
    try:
        decision = signDecision(
            identity,
            client.service,
            entry,
            state,
            time.time(),
            options["reason"],
        )
    except IdentityError as e:
        raise CommandError(f"cannot sign a decision about that key: {e}") from None
    record = await client.decide(decision)
    if options["json"]:
        _writeJSON(
            out,
            {
                "decision": decisionJSON(decision),
                "requestId": entry.get("id"),
                "peer": record,
            },
        )
    else:
        out.write(describeDecision(decision, entry) + "\n")
    return OK


async def _watch(
    reactor: Any, client: ControlClient, options: WatchOptions, out: TextIO, err: TextIO
) -> int:
    stopping = [False]

    def shutdown() -> Deferred[None]:
        stopping[0] = True
        return client.close(reactor)

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)

    def show(message: ControlMessage) -> None:
        if options["json"]:
            out.write(json.dumps(message.asJSON(), sort_keys=True) + "\n")
        else:
            out.write(formatMessage(message) + "\n")
        out.flush()

    await client.watch(show)
    err.write(
        f"dwtrust: watching {_printable(client.service)}'s control messages;"
        " stop with Ctrl-C\n"
    )
    err.flush()
    await client.whenClosed()
    if stopping[0]:
        return OK
    err.write("dwtrust: the service closed the control connection\n")
    return FAILED


async def _control(
    reactor: Any, options: _ControlOptions, out: TextIO, err: TextIO
) -> int:
    identity = Identity.load(options.directory)
    try:
        clientFromString(reactor, options["control"])
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(
            f"bad control endpoint {options['control']!r}: {e}"
        ) from None
    store = await SQLiteStore.open(options.store)
    try:
        client = await openControl(
            reactor,
            identity,
            options["control"],
            store,
            options["address"],
            timeout=options["timeout"],
        )
    except ConnectError as e:
        raise CommandError(
            f"cannot reach the control endpoint {options['control']}: {e}"
        ) from None
    finally:
        await store.close()
    try:
        if isinstance(options, WatchOptions):
            return await _watch(reactor, client, options, out, err)
        if isinstance(options, _DecideOptions):
            return await _decideCommand(client, identity, options, out)
        if isinstance(options, JoinTokenOptions):
            return await _joinToken(client, options, out, err)
        if isinstance(options, PendingOptions):
            listing = await client.pending()
            kind, text = "pending", formatPending(listing, client.service)
        else:
            listing = await client.peers()
            kind, text = "peers", formatPeers(listing, client.service)
        if options["json"]:
            _writeJSON(out, listingJSON(kind, listing, client.service))
        else:
            out.write(text)
        return OK
    finally:
        await client.close(reactor)


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


async def _joinToken(
    client: ControlClient, options: JoinTokenOptions, out: TextIO, err: TextIO
) -> int:
    token = await issueJoinToken(client, options["ttl"], options["via"])
    if options["json"]:
        _writeJSON(
            out,
            {
                "token": token.encode(),
                "tokenId": token.tokenId,
                "service": client.service,
                "fingerprint": token.fingerprint,
                "endpoint": token.endpoint,
                "expires": token.expires,
            },
        )
    else:
        out.write(token.encode() + "\n")
    err.write(
        _printable(
            f"dwtrust: join token {token.tokenId[:8]} for {client.service}"
            f" ({token.fingerprint}), for one new instance, until"
            f" {isoTime(token.expires)}; it dials {token.endpoint}"
        )
        + "\ndwtrust: start the instance with: twistd -n dwtrust --identity NEW_DIR"
        " --join TOKEN  (or: dwtrust clone --identity NEW_DIR --join TOKEN)\n"
    )
    return OK


async def _clone(reactor: Any, options: CloneOptions, out: TextIO) -> int:
    text = sys.stdin.read() if options["join"] == "-" else options["join"]
    token = JoinToken.parse(text)
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


async def _addOwner(options: AddOwnerOptions, out: TextIO) -> int:
    service = Identity.load(options.directory)
    try:
        with open(options["owner-key"]) as f:
            owner = readOwnerKey(f.read())
    except OSError as e:
        raise CommandError(f"cannot read {options['owner-key']}: {e}") from None
    except DecisionError as e:
        raise CommandError(f"{options['owner-key']}: {e}") from None
    registration = registerOwner(service, owner, time.time())
    store = await SQLiteStore.open(options.store)
    try:
        await store.addOwner(owner.fingerprint, registration.encode())
    finally:
        await store.close()
    out.write(
        f"registered {owner.name} ({owner.fingerprint}) as an owner of"
        f" {service.name}; restart its daemon to take effect\n"
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


def _runReactorCommand(options: usage.Options, err: TextIO, out: TextIO) -> int:
    status = [OK]

    def main(reactor: Any) -> Deferred[None]:
        if isinstance(options, ConnectOptions):
            running: Deferred[Any] = Deferred.fromCoroutine(_connect(reactor, options))
        elif isinstance(options, _ControlOptions):
            running = Deferred.fromCoroutine(_control(reactor, options, out, err))
        elif isinstance(options, AddOwnerOptions):
            running = Deferred.fromCoroutine(_addOwner(options, out))
        elif isinstance(options, InstantiateOptions):
            running = Deferred.fromCoroutine(_instantiate(options, out))
        elif isinstance(options, CloneOptions):
            running = Deferred.fromCoroutine(_clone(reactor, options, out))
        elif isinstance(options, RequestKeyOptions):
            running = Deferred.fromCoroutine(_requestKey(reactor, options, out, err))
        else:
            running = Deferred.fromCoroutine(_forget(options, out))  # type: ignore[arg-type]

        def succeeded(result: object) -> None:
            if isinstance(result, int):
                status[0] = result

        def failed(failure: Failure) -> None:
            # Whatever happens here, the command did not succeed.
            status[0] = FAILED
            if failure.check(DecisionRefused):
                err.write(
                    "dwtrust: the service refused the decision:"
                    f" {failure.getErrorMessage()}\n"
                )
                status[0] = REFUSED
            elif failure.check(JoinRefused, KeyRequestRefused, NotAnOwner):
                err.write(f"dwtrust: refused: {failure.getErrorMessage()}\n")
                status[0] = REFUSED
            elif failure.check(HandshakeFailed):
                err.write(_explainRefusal(failure.value, options))  # type: ignore[arg-type]
                status[0] = REFUSED
            elif failure.check(
                CommandError, IdentityError, StoreError, ControlFailed, JoinError
            ):
                err.write(f"dwtrust: {failure.getErrorMessage()}\n")
                status[0] = FAILED
            else:
                err.write(f"dwtrust: {failure.getErrorMessage()}\n")
                status[0] = FAILED

        return running.addCallbacks(succeeded, failed)

    # react() ends with sys.exit(); the status is ours to choose.
    with contextlib.suppress(SystemExit):
        react(main, [])
    return status[0]


def main(
    argv: Sequence[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """
    Run the C{dwtrust} command; return its exit status.
    """
    options = Options()  # type: ignore[no-untyped-call]
    try:
        options.parseOptions(  # type: ignore[no-untyped-call]
            list(sys.argv[1:] if argv is None else argv)
        )
    except usage.UsageError as e:
        err.write(f"{options}\ndwtrust: {e}\n")
        return USAGE
    command = options.subOptions
    try:
        if isinstance(command, KeygenOptions):
            return keygen(command, out)
        if isinstance(command, ShowOptions):
            return show(command, out)
        if isinstance(command, MigrateOptions):
            return migrate(command, out, err)
    except (IdentityError, CommandError) as e:
        err.write(f"dwtrust: {e}\n")
        return FAILED
    return _runReactorCommand(command, err, out)


if __name__ == "__main__":
    sys.exit(main())
