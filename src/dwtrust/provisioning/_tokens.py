"""
Join tokens: an owner's one-time, expiring permission for a new instance to
receive the service's key from a running one (seed S6).

A token names the instance to dial (a client endpoint description) and the
service's key fingerprint, and carries a random 256-bit secret.  The running
instance keeps only a hash of the secret, in memory: a token dies with the
instance that issued it.  The new instance pins the service's key from the
token (any other key is refused, so the secret only ever reaches the real
service), and proves it holds the secret with an HMAC over both ends' keys
(L{JoinToken.proof}); the secret itself never crosses the wire.

The text form is C{dwtrust-join-1.} followed by the unpadded URL-safe base64
of the fields C{endpoint}, C{fingerprint}, C{secret} and C{expires} (decimal
POSIX seconds), each a big-endian 16-bit length and its bytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import stat
import time
from collections.abc import Callable
from typing import TextIO

from attrs import field, frozen
from cryptography.hazmat.primitives import constant_time, hashes, hmac
from twisted.logger import Logger

from .._wire import WireError, decodeFields, encodeFields

#: The prefix of a token's text form; the digit is its version.
TOKEN_PREFIX = "dwtrust-join-1."
#: Bytes of randomness in a token's secret.
SECRET_BYTES = 32
#: A token's default, and longest, life in seconds.
DEFAULT_TOKEN_TTL = 600.0
MAX_TOKEN_TTL = 24 * 3600.0
#: The most tokens one instance keeps (issued, used or lapsed) at once.
MAX_TOKENS = 100
#: How many wrong proofs burn a token.
MAX_WRONG_PROOFS = 3
#: How long a used or lapsed token is remembered, to say so when it comes
#: back, rather than "unknown".
_REMEMBER = 3600.0

_DAMAGED = "the join token is damaged (cut short or mistyped?)"
_BURNT = "(burnt)"
_ID_LABEL = b"dwtrust-join-id"
_PROOF_LABEL = b"dwtrust-join-proof"


class JoinError(Exception):
    """
    A join token that cannot be used: the message says why.
    """


class JoinRefused(JoinError):
    """
    The running instance refused a join token (forged, used, lapsed).
    """


class JoinReused(JoinRefused):
    """
    A join token that was already used came back: it may have leaked.

    @ivar usedBy: the fingerprint of the instance that redeemed it first.
    """

    def __init__(self, usedBy: str) -> None:
        super().__init__("this join token was already used")
        self.usedBy = usedBy


def argvTokenRefusal(option: str) -> str:
    """
    The one-line refusal of a join token given on the command line, which
    every local user can read (C{/proc/PID/cmdline}, C{ps}); it never
    repeats the token.
    """
    return (
        f"{option} takes - (read the token from standard input), or use"
        " --join-file PATH (a file only you can read, chmod 600): a token on"
        " the command line can be read by every local user; take a new token"
        " with `dwtrust join-token`, this one may have been seen"
    )


def readJoinToken(join: str | None, joinFile: str | None, stdin: TextIO) -> str | None:
    """
    The join token text, from standard input (C{join} is C{-}) or from
    C{joinFile}, which only its owner may read; L{None} if neither is given.

    @raise JoinError: for a token given on the command line, both sources,
        or a file that cannot be read or that group or others can read; the
        message is one line and never holds the token.
    """
    if join is not None and join != "-":
        raise JoinError(argvTokenRefusal("--join"))
    if join is not None and joinFile is not None:
        raise JoinError("give --join - or --join-file PATH, not both")
    if join == "-":
        return stdin.read()
    if joinFile is None:
        return None
    try:
        return readSecretFile(joinFile, "--join-file")
    except ValueError as e:
        raise JoinError(str(e)) from None


def readSecretFile(path: str, option: str) -> str:
    """
    The text of a secret file that only its owner can read (mode 0600 or
    narrower), stripped of surrounding white space.  The mode is checked on
    the file opened, not on its name, and a symbolic link is not followed.

    @raise ValueError: if it cannot be read, is not a regular file, is empty,
        or group or others may read or write it, with a message that says how
        to fix it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        facts = os.fstat(f.fileno())
        if not stat.S_ISREG(facts.st_mode):
            raise ValueError(f"{option}: {path} is not a regular file")
        mode = stat.S_IMODE(facts.st_mode)
        if mode & 0o077:
            raise ValueError(
                f"{option}: {path} has mode {mode:04o}, so others can read it;"
                f" make it yours alone with chmod 600 {path}"
                + (
                    " and take a new token: this one may have been read"
                    if option == "--join-file"
                    else ""
                )
            )
        if facts.st_uid != os.geteuid():
            raise ValueError(
                f"{option}: {path} belongs to another user (uid {facts.st_uid})"
            )
        text = f.read(64 * 1024 + 1)
    if len(text) > 64 * 1024:
        raise ValueError(f"{option}: {path} is too large for a secret")
    try:
        content = text.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{option}: {path} is not ASCII text") from None
    if not content:
        raise ValueError(f"{option}: {path} is empty")
    return content


def _digest(*parts: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(encodeFields(*parts))
    return h.finalize()


@frozen
class JoinToken:
    """
    A join token, as the new instance holds it.

    @ivar endpoint: the client endpoint description of the running instance's
        control endpoint.
    @ivar fingerprint: the service's key fingerprint (C{SHA256:...}).
    @ivar secret: the random secret.
    @ivar expires: when it lapses (POSIX seconds; the issuer's clock decides).
    """

    endpoint: str
    fingerprint: str
    secret: bytes = field(repr=False)
    expires: int

    @property
    def tokenId(self) -> str:
        """
        The token's public name: a hash of its secret, as hex.  Safe to log.
        """
        return tokenIdOf(self.secret)

    def encode(self) -> str:
        fields = encodeFields(
            self.endpoint.encode("utf-8"),
            self.fingerprint.encode("ascii"),
            self.secret,
            str(self.expires).encode("ascii"),
        )
        return TOKEN_PREFIX + base64.urlsafe_b64encode(fields).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """
        Read a token's text form (surrounding space is ignored).

        @raise JoinError: if it is not a well-formed token.
        """
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise JoinError(f"not a dwtrust join token (it must start {TOKEN_PREFIX})")
        body = text[len(TOKEN_PREFIX) :]
        try:
            raw = base64.b64decode(
                body + "=" * (-len(body) % 4), altchars=b"-_", validate=True
            )
            endpoint, fingerprint, secret, expires = decodeFields(raw, 4)
            token = cls(
                endpoint.decode("utf-8"),
                fingerprint.decode("ascii"),
                secret,
                int(expires.decode("ascii"), 10),
            )
        except (binascii.Error, WireError, UnicodeDecodeError, ValueError):
            raise JoinError(_DAMAGED) from None
        if len(token.secret) != SECRET_BYTES or not token.fingerprint.startswith(
            "SHA256:"
        ):
            raise JoinError(_DAMAGED)
        if not token.endpoint:
            raise JoinError("the join token names no instance to join")
        return token

    def proof(self, serviceFingerprint: str, instanceFingerprint: str) -> bytes:
        """
        Proof of holding this token, for the connection between the service
        key C{serviceFingerprint} and the new instance's key
        C{instanceFingerprint} (both authenticated by the handshake).
        """
        return proofOf(self.secret, serviceFingerprint, instanceFingerprint)


def tokenIdOf(secret: bytes) -> str:
    """
    The public name of the token whose secret is C{secret}.
    """
    return _digest(_ID_LABEL, secret).hex()[:32]


def proofOf(secret: bytes, serviceFingerprint: str, instanceFingerprint: str) -> bytes:
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(
        encodeFields(
            _PROOF_LABEL,
            serviceFingerprint.encode("ascii"),
            instanceFingerprint.encode("ascii"),
        )
    )
    return mac.finalize()


class _Issued:
    """
    What an instance remembers of a token it issued.
    """

    def __init__(self, secret: bytes, expires: float, issuedBy: str) -> None:
        self.secret = secret
        self.expires = expires
        self.issuedBy = issuedBy
        self.usedBy = ""
        self.wrongProofs = 0


class JoinTokens:
    """
    The join tokens a running instance issued, in memory only.

    @ivar fingerprint: the service's key fingerprint.
    """

    log = Logger()

    def __init__(self, fingerprint: str, now: Callable[[], float] = time.time) -> None:
        self.fingerprint = fingerprint
        self._now = now
        self._tokens: dict[str, _Issued] = {}

    def issue(self, ttl: float, issuedBy: str) -> tuple[str, bytes, int]:
        """
        A new token's secret, for an owner.

        @param ttl: its life in seconds, at most L{MAX_TOKEN_TTL}.
        @param issuedBy: the owner's fingerprint.
        @return: the token's id, its secret and when it lapses.
        @raise JoinError: if C{ttl} is out of range, or too many tokens are
            outstanding.
        """
        if not (ttl > 0 and ttl <= MAX_TOKEN_TTL):
            raise JoinError(
                f"a join token lives more than 0 and at most {MAX_TOKEN_TTL:.0f}"
                " seconds"
            )
        self._forget()
        if len(self._tokens) >= MAX_TOKENS:
            raise JoinError(
                f"{MAX_TOKENS} join tokens are outstanding; use or let some lapse"
            )
        secret = os.urandom(SECRET_BYTES)
        expires = math.floor(self._now() + ttl)
        tokenId = tokenIdOf(secret)
        self._tokens[tokenId] = _Issued(secret, expires, issuedBy)
        return tokenId, secret, expires

    def redeem(self, tokenId: str, proof: bytes, instanceFingerprint: str) -> str:
        """
        Use a token, once.

        @return: the fingerprint of the owner who issued it.
        @raise JoinRefused: if no such token was issued here, it lapsed, or
            the proof is wrong.
        @raise JoinReused: if it was used already (it may have leaked).
        """
        self._forget()
        issued = self._tokens.get(tokenId)
        if issued is None:
            raise JoinRefused(
                "this instance issued no such join token (a forged token, or one"
                " issued before the instance restarted)"
            )
        if issued.usedBy == _BURNT:
            raise JoinRefused(
                f"this join token was burnt after {MAX_WRONG_PROOFS} wrong proofs"
            )
        if issued.usedBy:
            raise JoinReused(issued.usedBy)
        if self._now() >= issued.expires:
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(issued.expires))
            raise JoinRefused(f"this join token expired at {when}")
        expected = proofOf(issued.secret, self.fingerprint, instanceFingerprint)
        if not constant_time.bytes_eq(expected, proof):
            issued.wrongProofs += 1
            if issued.wrongProofs >= MAX_WRONG_PROOFS:
                issued.usedBy = _BURNT
            raise JoinRefused("the join token's proof is wrong")
        issued.usedBy = instanceFingerprint
        return issued.issuedBy

    def _forget(self) -> None:
        """
        Drop tokens that lapsed long enough ago.
        """
        cutoff = self._now() - _REMEMBER
        for tokenId in [t for t, i in self._tokens.items() if i.expires < cutoff]:
            del self._tokens[tokenId]
