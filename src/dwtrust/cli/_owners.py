"""
The owners' commands, over a service's control endpoint: C{dwtrust
pending}, C{peers}, C{approve}, C{deny}, C{block}, C{revoke}, C{watch} and
C{join-token}.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectError
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.filepath import FilePath

from .._decision import SignedDecision
from .._identity import Identity, IdentityError
from .._wrap import DEFAULT_TIMEOUT, STORE_FILE
from ..control import (
    ControlClient,
    ControlMessage,
    Listing,
    openControl,
    signDecision,
)
from ..control._protocol import DecisionRefused, exactly, matches, normalizePrefix
from ..provisioning import (
    MAX_TOKEN_TTL,
    issueJoinToken,
)
from ..store import SQLiteStore
from ._common import (
    FAILED,
    OK,
    CommandError,
    _address,
    _duration,
    _IdentityOptions,
    _positive,
    _printable,
    isoTime,
)

# The owners' commands: pending, peers, approve, deny, block, revoke, watch.

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The control endpoint owners reach by default.
DEFAULT_CONTROL = "unix:" + os.path.join("~", ".dwtrust", "control.sock")
#: The longest reason an owner may give.
MAX_REASON = 1000
#: The shortest prefix a destructive command takes without a confirmation.
MIN_PREFIX = 8
#: The decisions that take a key's access away.
DESTRUCTIVE = frozenset({"denied", "blocked", "revoked"})
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
        self["control"], self["address"] = controlAddress(self["control"])

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


class PendingOptions(_ControlOptions):
    synopsis = "[options]"
    longdesc = "List the requests waiting for an owner's decision."


class PeersOptions(_ControlOptions):
    synopsis = "[options]"
    longdesc = "List the keys the service has a decision about."


class WatchOptions(_ControlOptions):
    synopsis = "[options]"
    longdesc = (
        "Print the service's control messages as they arrive, one a line, until"
        " the connection closes or Ctrl-C."
    )


class _DecideOptions(_ControlOptions):
    #: The decision the command signs.
    state = ""
    synopsis = "[options] ID"
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


class _DestructiveOptions(_DecideOptions):
    optFlags = [
        *_DecideOptions.optFlags,
        [
            "yes",
            "y",
            f"Act on a prefix shorter than {MIN_PREFIX} characters without"
            " asking, if it matches one key only.",
        ],
    ]


class ApproveOptions(_DecideOptions):
    state = "approved"
    longdesc = (
        "Approve a pending request (or a decided key), given by a unique prefix"
        " of its request ID or fingerprint. The decision is signed with your key."
    )


class DenyOptions(_DestructiveOptions):
    state = "denied"
    synopsis = "[options] (ID | --source NETWORK)"
    longdesc = (
        "Deny a pending request (or a decided key), given by a unique prefix of"
        " its request ID or fingerprint; or, with --source, every pending"
        " request from an address in NETWORK (such as 203.0.113.0/24 or"
        " 2001:db8::/64), one signed decision each. The decision is signed with"
        " your key."
    )
    optParameters = [
        *_DestructiveOptions.optParameters,
        [
            "source",
            None,
            None,
            "Deny every pending request from this network (an address or"
            " ADDRESS/BITS) instead of one ID.",
        ],
    ]

    def parseArgs(self, target: str = "") -> None:
        self["target"] = target

    def postOptions(self) -> None:
        super().postOptions()
        if self["source"] is None:
            if not normalizePrefix(self["target"]):
                raise usage.UsageError("give a request ID or a fingerprint")
            return
        if self["target"]:
            raise usage.UsageError("give a request ID or --source, not both")
        try:
            self["source"] = ipaddress.ip_network(self["source"], strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--source: {e}") from None


class BlockOptions(_DestructiveOptions):
    state = "blocked"
    synopsis = "[options] ID_OR_FINGERPRINT"
    longdesc = (
        "Block a key, so that it is refused and raises no more requests. Give a"
        " unique prefix of its request ID or fingerprint."
    )


class RevokeOptions(_DestructiveOptions):
    state = "revoked"
    synopsis = "[options] FINGERPRINT"
    longdesc = (
        "Revoke a key the service has a decision about, given by a unique prefix"
        " of its fingerprint: its open sessions close, and it is refused from"
        " now on."
    )


class JoinTokenOptions(_ControlOptions):
    synopsis = "[options]"
    longdesc = (
        "Take a one-time join token from a running instance, as one of its"
        " owners. A new instance started with it (twistd dwtrust --join-file"
        " FILE, or dwtrust clone --join - < FILE) receives the service's key,"
        " owners and decisions from that instance. The token alone goes to"
        " standard output; keep it secret, in a file only you can read (umask"
        " 077), never on a command line: it is a key to the key."
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
        if self["ttl"] > MAX_TOKEN_TTL:
            raise usage.UsageError(
                f"--ttl: a join token lives at most {MAX_TOKEN_TTL / 3600:g}h"
            )
        self["via"] = controlAddress(self["via"])[0] if self["via"] else self["control"]


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
    entry = await _named(client, options)
    target = options["target"]
    if (
        options.state in DESTRUCTIVE
        and len(normalizePrefix(target)) < MIN_PREFIX
        and not exactly(target, entry)
    ):
        await _checkShortPrefix(client, options, entry)
    return entry


async def _checkShortPrefix(
    client: ControlClient, options: _DecideOptions, entry: dict[str, Any]
) -> None:
    """
    Let a destructive command act on a prefix shorter than L{MIN_PREFIX}
    only if it matches one key among the requests and the decided keys
    both, and the user confirms: with C{--yes}, or by answering at a
    terminal.

    @raise CommandError: if not.
    """
    target = options["target"]
    found = [
        e
        for listing in (
            ([] if options.state == "revoked" else [await client.pending(target)])
            + [await client.peers(target)]
        )
        for e in listing.entries
        if matches(target, e)
    ]
    if len(found) > 1:
        resolve(target, found, "key")  # raises, listing them
    verb = {"denied": "deny", "blocked": "block", "revoked": "revoke"}[options.state]
    about = _printable(
        f"{entry.get('org', '')}/{entry.get('service', '')} {entry.get('fingerprint')}"
    )
    if options["yes"]:
        return
    short = (
        f"{_printable(target)!r} is shorter than {MIN_PREFIX} characters"
        f" (after SHA256:)"
    )
    if not _interactive():
        raise CommandError(
            f"{short}; it matches {about} only: give more of it, or add --yes"
            f" to {verb} that key"
        )
    answer = await deferToThread(
        _ask, f"dwtrust: {short} and matches {about}; {verb} it? [y/N] "
    )
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError(f"not confirmed: nothing was {options.state}")


def _interactive() -> bool:
    """
    Whether a person can answer a question: standard input and error are
    terminals.
    """
    return sys.stdin.isatty() and sys.stderr.isatty()


def _ask(question: str) -> str:
    """
    Ask C{question} on standard error; the answer line, or nothing at the
    end of input. (In a thread: it blocks.)
    """
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline()


async def _named(client: ControlClient, options: _DecideOptions) -> dict[str, Any]:
    """
    The one entry a decision command's argument begins.
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


# The JSON vocabulary of every --json output (docs/cli.rst): camelCase keys;
# a key's identity is {"organization", "service", "algorithm", "fingerprint"}
# (and "publicKey" where known); the key asking is under "peer"; the
# service a fact is about is "service" at the top.  The control channel's
# own messages keep their names: they are mapped here.

#: The facts of an identity, in the vocabulary, and the names the control
#: channel's entries give them.
_IDENTITY_FIELDS = (
    ("organization", "org"),
    ("service", "service"),
    ("algorithm", "algorithm"),
    ("fingerprint", "fingerprint"),
    ("publicKey", "publicKey"),
)
#: The control channel's names for the other facts of an entry.
_RENAMED = {"id": "requestId"}


def identityJSON(
    organization: str,
    service: str,
    algorithm: str,
    fingerprint: str,
    publicKey: str | None = None,
) -> dict[str, str]:
    """
    An identity, as every C{--json} output shows one.
    """
    facts = {
        "organization": organization,
        "service": service,
        "algorithm": algorithm,
        "fingerprint": fingerprint,
    }
    if publicKey:
        facts["publicKey"] = publicKey
    return facts


def entryJSON(entry: dict[str, Any]) -> dict[str, Any]:
    """
    A pending request or a decided key, as the control channel lists it, in
    the vocabulary: its key's identity under C{peer}, C{requestId} for
    C{id}, the other facts as they are.
    """
    peer = {
        ours: entry[theirs]
        for ours, theirs in _IDENTITY_FIELDS
        if theirs in entry and (ours != "publicKey" or entry[theirs])
    }
    identity = {theirs for _, theirs in _IDENTITY_FIELDS}
    facts = {_RENAMED.get(k, k): v for k, v in entry.items() if k not in identity}
    facts["peer"] = peer
    return facts


def messageJSON(message: ControlMessage) -> dict[str, Any]:
    """
    A control message, in the vocabulary: C{service} is the service it
    comes from, C{peer} the key it is about.
    """
    facts = message.asJSON()
    facts["peer"] = identityJSON(
        facts.pop("org"),
        facts.pop("peerService"),
        facts.pop("algorithm"),
        facts.pop("fingerprint"),
    )
    facts["knownKeys"] = [{"fingerprint": f} for f in message.knownKeys]
    return facts


def decisionJSON(
    decision: SignedDecision,
    entry: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    A signed decision's facts, for C{--json}: what approve, deny, block and
    revoke print.

    @param entry: the request or key it decided, as listed.
    @param record: the service's answer: the key's record after it.
    """
    facts: dict[str, Any] = {
        "service": decision.service,
        "state": decision.state,
        "peer": identityJSON(
            decision.org,
            decision.subjectService,
            decision.algorithm,
            decision.fingerprint,
            (entry or {}).get("publicKey"),
        ),
        "requestId": (entry or {}).get("id") or None,
        "decidedAt": decision.decidedAt,
        "decidedBy": decision.signer,
        "reason": decision.reason,
        "serviceKey": decision.serviceKey,
        "sequence": decision.sequence,
        "signature": base64.b64encode(decision.signature).decode("ascii"),
    }
    if record is not None:
        facts["stored"] = record.get("stored", True)
        if record.get("storeError"):
            facts["storeError"] = record["storeError"]
    return facts


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
        kind: [entryJSON(e) for e in listing.entries],
    }


def _writeJSON(out: TextIO, value: Any) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _sourceIn(source: str, network: Network) -> bool:
    """
    Whether the address of C{source} (C{HOST:PORT}, C{[HOST]:PORT}) is in
    C{network}.
    """
    if source.startswith("["):
        host = source[1:].partition("]")[0]
    else:
        host = source.rpartition(":")[0] if source.count(":") == 1 else source
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.version == network.version and address in network


async def _denySource(
    client: ControlClient, identity: Identity, options: DenyOptions, out: TextIO
) -> int:
    """
    Deny every pending request from C{--source}'s network: one signed
    decision each, sent over the control channel.
    """
    network: Network = options["source"]
    listing = await client.pending(limit=1_000_000)
    chosen = [
        e
        for e in listing.entries
        if e.get("kind") != "key_request" and _sourceIn(str(e.get("source")), network)
    ]
    reason = options["reason"] or f"denied with every request from {network}"
    denied = []
    for entry in chosen:
        decision = signDecision(
            identity, client.peer, entry, "denied", time.time(), reason
        )
        try:
            await client.decide(decision)
        except DecisionRefused as e:
            # Decided meanwhile (or lapsed): the others go on.
            out.write(_printable(f"not denied {entry['fingerprint']}: {e}") + "\n")
            continue
        denied.append(entry)
        if not options["json"]:
            out.write(describeDecision(decision, entry) + "\n")
    if options["json"]:
        _writeJSON(
            out,
            {
                "source": str(network),
                "denied": [
                    {"requestId": e.get("id"), "peer": entryJSON(e)["peer"]}
                    for e in denied
                ],
                "matched": len(chosen),
            },
        )
    else:
        out.write(
            f"denied {len(denied)} of {len(chosen)} pending request(s) from {network}\n"
        )
    return OK


async def _decideCommand(
    client: ControlClient, identity: Identity, options: _DecideOptions, out: TextIO
) -> int:
    if isinstance(options, DenyOptions) and options["source"] is not None:
        return await _denySource(client, identity, options, out)
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
        if options["json"]:
            facts = entryJSON(entry)
            _writeJSON(
                out,
                {
                    "service": client.service,
                    "state": options.state,
                    "peer": facts["peer"],
                    "requestId": facts.get("requestId"),
                    "unchanged": True,
                },
            )
            return OK
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
            client.peer,
            entry,
            state,
            time.time(),
            options["reason"],
        )
    except IdentityError as e:
        raise CommandError(f"cannot sign a decision about that key: {e}") from None
    record = await client.decide(decision)
    if options["json"]:
        _writeJSON(out, decisionJSON(decision, entry, record))
    else:
        out.write(describeDecision(decision, entry) + "\n")
        if record.get("stored") is False:
            out.write(
                _printable(
                    "dwtrust: it is in force on the service, but NOT STORED yet"
                    f" ({record.get('storeError') or 'the trust store failed'});"
                    " the service keeps refusing the key and keeps trying to"
                    " store it"
                )
                + "\n"
            )
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
            out.write(json.dumps(messageJSON(message), sort_keys=True) + "\n")
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
        + "\ndwtrust: save it to a file only you can read (umask 077), then start"
        " the instance with: twistd -n dwtrust --identity NEW_DIR --join-file"
        " FILE  (or: dwtrust clone --identity NEW_DIR --join - < FILE)\n"
    )
    return OK
