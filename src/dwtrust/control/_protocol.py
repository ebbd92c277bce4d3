"""
The control channel's commands, in AMP (L{twisted.protocols.amp}).

An owner's client asks; the service answers:

- L{ListPending}: the pending requests, one page at a time.
- L{ListPeers}: the keys with a decision, one page at a time.
- L{Decide}: apply a decision the owner signed.
- L{Watch}: from now on, push every control message to the client as a
  L{Notify} command, until the connection closes.

Lists travel as JSON text.  An AMP value holds at most 64 KiB, so a list is cut
into pages (L{PAGE_ENTRIES} entries at most, and at most L{PAGE_BYTES} of
JSON); each page says the total, and the client asks for the next page by
offset.  Both lists can be filtered by a prefix of a request identifier or of
a fingerprint (L{matches}), so that finding one key among many costs one page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from attrs import fields
from twisted.protocols import amp

from .._bus import ControlMessage

#: The most entries in one page of a list.
PAGE_ENTRIES = 500
#: The most bytes of JSON in one page of a list: under AMP's 64 KiB limit on
#: one value, with room to spare.
PAGE_BYTES = 60_000
#: The most other known keys an entry lists for its org/service.
MAX_KNOWN_KEYS = 20

_FINGERPRINT_PREFIX = "SHA256:"


class DecisionRefused(Exception):
    """
    The service did not apply a decision; the message says why (it does not
    parse, it is not signed by a registered owner, it is for another service,
    its signature does not verify, or it contradicts what the store holds).
    """


class ControlFailed(Exception):
    """
    The service could not answer (its trust store failed, say); the message
    says why.
    """


class NotAnOwner(Exception):
    """
    An owner's command from a key that is not a registered owner (a new
    instance or a service router, which may use the provisioning commands
    only).
    """


_ERRORS: dict[type[Exception], bytes] = {
    ControlFailed: b"CONTROL_FAILED",
    NotAnOwner: b"NOT_AN_OWNER",
}


class ListPending(amp.Command):
    """
    The pending requests, oldest first: a page of JSON, C{{"total": N,
    "offset": K, "entries": [...]}}, whose entries have C{id}, C{fingerprint},
    C{org}, C{service}, C{algorithm}, C{publicKey} (an OpenSSH line),
    C{source}, C{firstSeen}, C{lastSeen}, C{attempts}, C{expires} and
    C{knownKeys} (the other keys of that org/service, each with its
    C{fingerprint} and C{state}).
    """

    arguments = [
        (b"offset", amp.Integer(optional=True)),
        (b"prefix", amp.Unicode(optional=True)),
    ]
    response = [(b"page", amp.Unicode())]
    errors = _ERRORS


class ListPeers(amp.Command):
    """
    The keys with a decision, oldest first: a page of JSON as L{ListPending}'s,
    whose entries have C{fingerprint}, C{org}, C{service}, C{algorithm},
    C{publicKey}, C{state}, C{decidedBy}, C{firstSeen}, C{lastSeen},
    C{attempts} and C{source}.
    """

    arguments = ListPending.arguments
    response = ListPending.response
    errors = _ERRORS


class Decide(amp.Command):
    """
    Apply a decision signed by a registered owner: an encoded
    L{dwtrust._decision.SignedDecision}.  The answer is the key's record as it
    now stands, as JSON (a L{ListPeers} entry).
    """

    arguments = [(b"decision", amp.String())]
    response = [(b"peer", amp.Unicode())]
    errors = {DecisionRefused: b"DECISION_REFUSED", **_ERRORS}


class Watch(amp.Command):
    """
    Send this connection every control message from now on, as L{Notify}
    commands.
    """

    arguments = []
    response = []
    errors = _ERRORS


class Notify(amp.Command):
    """
    A control message (L{ControlMessage.asJSON}, as JSON text), from the
    service to a watching owner.  Not answered.
    """

    arguments = [(b"message", amp.Unicode())]
    response = []
    requiresAnswer = False


def dumps(value: Any) -> str:
    """
    Compact JSON, ASCII only (so its length is its size on the wire).
    """
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def page(entries: list[dict[str, Any]], offset: int, total: int) -> str:
    """
    A page of a list, as JSON text: as many of C{entries} (which start at
    C{offset} in a list of C{total}) as fit in L{PAGE_ENTRIES} and
    L{PAGE_BYTES}, and always at least one if there are any.
    """
    chosen: list[dict[str, Any]] = []
    size = len(dumps({"total": total, "offset": offset, "entries": []}))
    for entry in entries[:PAGE_ENTRIES]:
        text = dumps(entry)
        if chosen and size + len(text) + 1 > PAGE_BYTES:
            break
        chosen.append(entry)
        size += len(text) + 1
    return dumps({"total": total, "offset": offset, "entries": chosen})


def encodeMessage(message: ControlMessage) -> str:
    """
    A control message as JSON text that fits in one AMP value: a message
    whose list of known keys or reason would not fit is shortened.
    """
    facts = message.asJSON()
    text = dumps(facts)
    if len(text) > PAGE_BYTES:
        known = facts["knownKeys"]
        facts["knownKeys"] = known[:MAX_KNOWN_KEYS]
        facts["knownKeysOmitted"] = len(known) - len(facts["knownKeys"])
        facts["reason"] = facts["reason"][:1000]
        text = dumps(facts)
    return text


def decodeMessage(text: str) -> ControlMessage:
    """
    The control message in C{text}, from L{encodeMessage}.

    @raise ValueError: if it is not one.
    """
    facts = json.loads(text)
    if not isinstance(facts, dict):
        raise ValueError("a control message is a JSON object")
    facts.pop("knownKeysOmitted", None)
    known = {a.name for a in fields(ControlMessage)}
    try:
        return ControlMessage.fromJSON({k: v for k, v in facts.items() if k in known})
    except TypeError as e:
        raise ValueError(f"not a control message: {e}") from None


def normalizePrefix(prefix: str) -> str:
    """
    A request identifier's or fingerprint's prefix as typed, without
    surrounding space or a C{SHA256:} in front.
    """
    prefix = prefix.strip()
    if prefix.upper().startswith(_FINGERPRINT_PREFIX.upper()):
        prefix = prefix[len(_FINGERPRINT_PREFIX) :]
    return prefix


def matchesKey(prefix: str, requestId: str, fingerprint: str) -> bool:
    """
    Whether C{prefix} (see L{normalizePrefix}) begins C{requestId} (case does
    not matter) or C{fingerprint}'s base64 (case matters).  An empty prefix
    matches everything.
    """
    prefix = normalizePrefix(prefix)
    if fingerprint.startswith(_FINGERPRINT_PREFIX):
        fingerprint = fingerprint[len(_FINGERPRINT_PREFIX) :]
    return bool(
        (requestId and requestId.lower().startswith(prefix.lower()))
        or fingerprint.startswith(prefix)
    )


def matches(prefix: str, entry: Mapping[str, Any]) -> bool:
    """
    Whether C{prefix} begins C{entry}'s request identifier or fingerprint, as
    L{matchesKey}.
    """
    return matchesKey(
        prefix, str(entry.get("id") or ""), str(entry.get("fingerprint") or "")
    )


def exactly(prefix: str, entry: Mapping[str, Any]) -> bool:
    """
    Whether C{prefix} is the whole of C{entry}'s request identifier or
    fingerprint.
    """
    prefix = normalizePrefix(prefix)
    fingerprint = str(entry.get("fingerprint", ""))
    return bool(
        (entry.get("id") and str(entry["id"]).lower() == prefix.lower())
        or fingerprint == _FINGERPRINT_PREFIX + prefix
    )
