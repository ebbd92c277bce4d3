r"""
acme's approval policy: approve the keys acme's deployment system handed out,
each for the one org/service it was handed out as.

Names are claims: anyone can make a key and claim to be acme/billing.  Only
keys are proved.  So this policy decides on the key: it approves a key only
if the allow-list lists its fingerprint, and only under the org/service
listed with it.  About any other key it has no opinion, and the next approver
(the owners) decides.

The allow-list is a file, $ACME_ALLOWED_KEYS, with one key a line: the line
`dwtrust keygen` writes to id_dwtrust.pub (an OpenSSH public key whose comment
is org/service), or a SHA256: fingerprint and then org/service.

    ACME_ALLOWED_KEYS=/etc/acme/dwtrust/allowed_keys PYTHONPATH=docs/examples \
        twistd -n dwtrust --identity /srv/ledger \
        --approver python:acme_approval.policy --approver owners
"""

from __future__ import annotations

import os
import re

from twisted.logger import Logger
from twisted.python.filepath import FilePath

from dwtrust import IdentityError, PublicKey
from dwtrust.approval import ApprovalRequest, Decision

#: A SHA-256 fingerprint, as ``ssh-keygen -lf`` and ``dwtrust`` print it.
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
#: The org/service a key was handed out as.
NAME = re.compile(r"[a-z0-9._-]+/[a-z0-9._-]+")


class AllowListError(ValueError):
    """
    The allow-list cannot be read, or a line of it is malformed.
    """


def parseLine(line: str) -> tuple[str, str] | None:
    """
    Parse one line of the allow-list.

    @return: the key's fingerprint and the org/service it was handed out as,
        or L{None} for a blank line or a comment.
    @raise ValueError: if the line is malformed.
    """
    words = line.split()
    if not words or words[0].startswith("#"):
        return None
    if words[0].startswith("SHA256:"):
        if FINGERPRINT.fullmatch(words[0]) is None:
            raise ValueError(f"{words[0]!r} is not a SHA256: fingerprint")
        fingerprint, names = words[0], words[1:]
    else:
        try:
            fingerprint = PublicKey.fromOpenSSH(line).fingerprint
        except IdentityError as e:
            raise ValueError(f"not a public key: {e}") from None
        names = words[2:]
    # A key without a name is an error, never a key for any name.
    if len(names) != 1 or NAME.fullmatch(names[0]) is None:
        raise ValueError(
            "the key must be followed by the one org/service it was handed"
            f" out as, not {' '.join(names) or 'nothing'!r}"
        )
    return fingerprint, names[0]


def parseAllowList(text: str, where: str) -> dict[str, str]:
    """
    Parse an allow-list.

    @param where: the file's name, for the messages.
    @return: the org/service each key was handed out as, by fingerprint.
    @raise AllowListError: for the first malformed line, naming it.
    """
    allowed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parseLine(line)
        except ValueError as e:
            raise AllowListError(f"{where}, line {number}: {e}") from None
        if parsed is None:
            continue
        fingerprint, name = parsed
        if allowed.setdefault(fingerprint, name) != name:
            raise AllowListError(
                f"{where}, line {number}: {fingerprint} is listed as both"
                f" {allowed[fingerprint]} and {name}"
            )
    return allowed


class AllowListPolicy:
    """
    An approval callback that approves the keys of an allow-list, under the
    names listed with them.

    The file is read when the policy is made, so that a missing or malformed
    allow-list stops the daemon at start-up, and read again when it changes.
    (Reading a small local file is quick, and the policy is asked only about
    keys the trust store does not know yet.)
    """

    log = Logger()
    name = "acme-allow-list"

    def __init__(self, path: FilePath[str]) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._allowed: dict[str, str] = {}
        self.allowed()

    def allowed(self) -> dict[str, str]:
        """
        The allow-list as it is now: the org/service each key was handed out
        as, by fingerprint.

        @raise AllowListError: if it cannot be read, or is malformed.
        """
        try:
            status = os.stat(self.path.path)
            stamp = (status.st_ino, status.st_size, status.st_mtime_ns)
            if stamp != self._stamp:
                text = self.path.getContent().decode("utf-8")
                self._allowed = parseAllowList(text, self.path.path)
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as e:
            raise AllowListError(f"cannot read {self.path.path}: {e}") from None
        return self._allowed

    def __call__(self, request: ApprovalRequest) -> Decision | None:
        peer = request.peer
        listedAs = self.allowed().get(peer.fingerprint)
        if listedAs is None:
            # Not a key the deployment handed out: no opinion.  The names it
            # claims decide nothing.
            return None
        if listedAs != peer.name:
            # A key acme handed out, claiming a name it was not given: its
            # holder is not who it claims to be.  Refused, and not stored.
            self.log.warn(
                "acme: the key {fingerprint}, handed out as {listed}, claims to"
                " be {claimed}; refused",
                fingerprint=peer.fingerprint,
                listed=listedAs,
                claimed=peer.name,
            )
            return Decision(
                False,
                f"this key was not handed out as {peer.name}",
                self.name,
                remember=False,
            )
        # Remembered: signed with the service's key and stored, so later
        # connections pass at once.
        return Decision(
            True, f"the deployment handed this key out as {listedAs}", self.name
        )


#: What C{--approver python:acme_approval.policy} names.
policy = AllowListPolicy(
    FilePath(os.environ.get("ACME_ALLOWED_KEYS", "/etc/acme/dwtrust/allowed_keys"))
)
