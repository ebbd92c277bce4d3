"""
A static allow-list: keys approved in advance, by public key or fingerprint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .._identity import IdentityError, PublicKey
from ._interface import ApprovalRequest, Decision, IApprover

#: A whole key fingerprint, as C{ssh-keygen -lf} prints it.
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def _entry(text: str) -> str:
    """
    The fingerprint one line names: a C{SHA256:} fingerprint, or an OpenSSH
    public-key line.

    @raise ValueError: saying why it is neither.
    """
    if text.startswith("SHA256:"):
        fingerprint = text.split()[0]
        if not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(
                f"{fingerprint!r} is not a whole SHA256: fingerprint (43 base64"
                " characters after 'SHA256:', as `ssh-keygen -lf` prints)"
            )
        return fingerprint
    try:
        return PublicKey.fromOpenSSH(text).fingerprint
    except IdentityError as e:
        raise ValueError(
            f"not an OpenSSH public key or a SHA256: fingerprint ({e})"
        ) from None


def readAllowEntries(entries: Iterable[str]) -> frozenset[str]:
    """
    The fingerprints that C{--allow} entries name.  Each entry is a
    C{SHA256:} fingerprint, or a file: an OpenSSH public-key file (as
    C{dwtrust keygen} writes it), or a list with one public key or
    fingerprint per line, blank lines and C{#} comments ignored.

    @raise ValueError: for the first entry or line that is neither, naming
        the file and line, in one line.
    """
    fingerprints: set[str] = set()
    for entry in entries:
        if entry.startswith("SHA256:") and not os.path.exists(entry):
            try:
                fingerprints.add(_entry(entry))
            except ValueError as e:
                raise ValueError(f"--allow {entry}: {e}") from None
            continue
        path = os.path.expanduser(entry)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ValueError(
                f"--allow {entry}: cannot read it ({why}); give a public-key"
                " file, a file of keys or fingerprints, or a SHA256: fingerprint"
            ) from None
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                fingerprints.add(_entry(text))
            except ValueError as e:
                raise ValueError(f"--allow {entry}, line {number}: {e}") from None
    return frozenset(fingerprints)


@implementer(IApprover)
class AllowList:
    """
    Approves the keys it lists, and passes every other key on (fires with
    L{None}), to the next approver of a chain.

    An approval is signed with the service's own key and stored, as every
    approver's is (see L{ApprovalPolicy <dwtrust.ApprovalPolicy>}): taking a
    key off the list later does not revoke it; C{dwtrust revoke} does.

        >>> AllowList(["SHA256:..."])
        >>> AllowList.fromEntries(["/etc/dwtrust/allowed-keys"])

    @ivar fingerprints: the keys listed.
    """

    name = "allow"

    def __init__(self, fingerprints: Iterable[str] = ()) -> None:
        """
        @param fingerprints: whole C{SHA256:} fingerprints.
        @raise ValueError: if one is not.
        """
        self.fingerprints: frozenset[str] = frozenset()
        self.replace(fingerprints)

    @classmethod
    def fromEntries(cls, entries: Sequence[str]) -> AllowList:
        """
        The allow-list that C{--allow} entries give (see
        L{readAllowEntries}); L{reload} reads them again.

        @raise ValueError: for an entry or line that is wrong.
        """
        allowList = cls(readAllowEntries(entries))
        allowList.entries = tuple(entries)
        return allowList

    #: The entries the list was read from (see L{fromEntries}).
    entries: tuple[str, ...] = ()

    def replace(self, fingerprints: Iterable[str]) -> None:
        """
        List exactly C{fingerprints} from now on.

        @raise ValueError: if one is not a whole C{SHA256:} fingerprint.
        """
        listed = frozenset(fingerprints)
        for fingerprint in listed:
            if not FINGERPRINT.fullmatch(fingerprint):
                raise ValueError(f"{fingerprint!r} is not a whole SHA256: fingerprint")
        self.fingerprints = listed

    def reload(self) -> tuple[frozenset[str], frozenset[str]]:
        """
        Read the entries again; all or nothing.

        @return: the fingerprints added and removed.
        @raise ValueError: for an entry or line that is wrong (and the list
            stays as it was).
        """
        listed = readAllowEntries(self.entries)
        before, self.fingerprints = self.fingerprints, listed
        return listed - before, before - listed

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self.fingerprints

    def __len__(self) -> int:
        return len(self.fingerprints)

    def __repr__(self) -> str:
        return f"<AllowList of {len(self.fingerprints)} key(s)>"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        if request.peer.fingerprint in self.fingerprints:
            return succeed(Decision(True, "listed in the allow list", self.name))
        return succeed(None)
