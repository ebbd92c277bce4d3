"""
Identities: an organization, a service name and a key pair.

Public keys travel in the OpenSSH wire format (RFC 4253, section 6.6) and are
shown as OpenSSH public-key lines and ``SHA256:<base64>`` fingerprints, the
same ones ``ssh-keygen -lf`` prints.  Every primitive comes from
``cryptography``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pwd
import re
import stat
from collections.abc import Callable
from typing import TypeAlias

from attrs import field, frozen
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from twisted.python.filepath import FilePath

PrivateKey: TypeAlias = (
    ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
)
PublicKeyObject: TypeAlias = (
    ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
)

#: The smallest RSA modulus accepted, from us or from a peer.
MIN_RSA_BITS = 3072

#: Names are lower-case so that ``Acme`` and ``acme`` cannot be two services.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?")
MAX_NAME_LENGTH = 63

PRIVATE_KEY_FILE = "id_dwtrust"
PUBLIC_KEY_FILE = "id_dwtrust.pub"
IDENTITY_FILE = "identity.json"


class IdentityError(Exception):
    """
    An identity, a key or a name is missing, malformed or unsafe.  The message
    says which, and what to do about it.
    """


class IdentityMismatch(IdentityError):
    """
    The names given for an identity differ from those it holds.
    """


def _userName(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _user(uid: int) -> str:
    name = _userName(uid)
    return name if name.startswith("uid ") else f"{name} (uid {uid})"


def permissionAdvice(path: str, doing: str, option: str = "--identity") -> str:
    """
    One line for a permission denied on C{path}: which path stops us, whose
    it is, who we are, and what to do (run as the directory's owner, or give
    C{--identity} a directory we can use).

    @param doing: what was being done to C{path}, as in C{"cannot DOING
        PATH"}: C{"read the identity in"}, C{"create the identity
        directory"}.
    @param option: the option that gives another path.
    """
    path = os.path.abspath(path)
    blocker = path
    facts: os.stat_result | None = None
    while True:
        try:
            facts = os.stat(blocker)
            break
        except OSError:
            parent = os.path.dirname(blocker)
            if parent == blocker:
                break
            blocker = parent
    me = _user(os.geteuid())
    if facts is None:
        return f"cannot {doing} {path}: permission denied; give {option} another path"
    owner = _user(facts.st_uid)
    mode = f"{stat.S_IMODE(facts.st_mode):04o}"
    inside = blocker == path or blocker.startswith(path + os.sep)
    if not inside:
        # The directory does not exist, and cannot be made where it was asked for.
        home = os.environ.get("HOME")
        default = (
            f" (the default, ~/.dwtrust, is under HOME={home})"
            if option == "--identity"
            and home
            and path.startswith(os.path.join(home, ""))
            else ""
        )
        if facts.st_uid == os.geteuid():
            return (
                f"cannot {doing} {path}: permission denied: {blocker} has mode"
                f" {mode}; let its owner write there (chmod u+wx {blocker}), or"
                f" give {option} a path in a directory this user can write"
                f"{default}"
            )
        return (
            f"cannot {doing} {path}: permission denied: {blocker} belongs to"
            f" {owner} with mode {mode}, and this process runs as {me}; give"
            f" {option} a path in a directory this user can write{default}"
        )
    if facts.st_uid != os.geteuid():
        what = "it" if blocker == path else blocker
        return (
            f"cannot {doing} {path}: permission denied: {what} belongs to {owner}"
            f" with mode {mode}, and this process runs as {me}; run as"
            f" {_userName(facts.st_uid)}, or give {option} another path"
        )
    return (
        f"cannot {doing} {path}: permission denied: {blocker} has mode {mode};"
        f" make it readable and writable by its owner (chmod u+rwX {blocker}),"
        f" or give {option} another path"
    )


def _failedTo(error: OSError, doing: str, path: str) -> IdentityError:
    if isinstance(error, PermissionError):
        return IdentityError(permissionAdvice(path, doing))
    return IdentityError(f"cannot {doing} {path}: {error.strerror or error}")


def holdsIdentity(directory: FilePath[str]) -> bool:
    """
    Whether C{directory} holds an identity (its private key file).  A
    directory that cannot be looked into is not taken for an empty one.

    @raise IdentityError: if C{directory} cannot be read, or is not a
        directory.
    """
    try:
        os.stat(directory.child(PRIVATE_KEY_FILE).path)
    except FileNotFoundError:
        return False
    except OSError as e:
        if isinstance(e, NotADirectoryError):
            raise IdentityError(f"{directory.path} is not a directory") from None
        raise _failedTo(e, "read the identity in", directory.path) from None
    return True


def validateName(kind: str, name: str) -> str:
    """
    Check an organization or service name.

    @param kind: C{"organization"} or C{"service"}, for the message.
    @return: C{name}, unchanged.
    @raise IdentityError: if C{name} is empty, too long, or has a character
        outside lower-case ASCII letters, digits, C{.}, C{_} and C{-}, or does
        not start and end with a letter or digit.
    """
    if not isinstance(name, str) or not name:
        raise IdentityError(f"the {kind} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise IdentityError(
            f"the {kind} name is {len(name)} characters long;"
            f" at most {MAX_NAME_LENGTH} are allowed"
        )
    if _NAME.fullmatch(name) is None:
        raise IdentityError(
            f"the {kind} name {name!r} is not allowed: use lower-case letters,"
            " digits, '.', '_' and '-', starting and ending with a letter or digit"
        )
    return name


def _sshString(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _readSSHString(blob: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(blob):
        raise IdentityError("truncated public key")
    length = int.from_bytes(blob[offset : offset + 4], "big")
    end = offset + 4 + length
    if end > len(blob):
        raise IdentityError("truncated public key")
    return blob[offset + 4 : end], end


@frozen
class Algorithm:
    """
    One public-key algorithm: its wire name, the key type inside its blob,
    and how it signs and verifies.

    @ivar name: the public-key algorithm name sent on the wire.
    @ivar keyType: the key type string at the start of the OpenSSH blob.
    @ivar shortName: the name used on the command line.
    """

    name: str
    keyType: str
    shortName: str
    _generate: Callable[[], PrivateKey] = field(repr=False)
    _matches: Callable[[PublicKeyObject], bool] = field(repr=False)

    def generate(self) -> PrivateKey:
        return self._generate()

    def matches(self, key: PublicKeyObject) -> bool:
        return self._matches(key)

    def sign(self, key: PrivateKey, data: bytes) -> bytes:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(_ecHash(key.curve)))
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def verify(self, key: PublicKeyObject, signature: bytes, data: bytes) -> bool:
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(_ecHash(key.curve)))
            else:
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True


def _ecHash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(curve, ec.SECP384R1) else hashes.SHA256()


def _isCurve(curveType: type[ec.EllipticCurve]) -> Callable[[PublicKeyObject], bool]:
    def matches(key: PublicKeyObject) -> bool:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
            key.curve, curveType
        )

    return matches


def _isStrongRSA(key: PublicKeyObject) -> bool:
    return isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm(
            "ssh-ed25519",
            "ssh-ed25519",
            "ed25519",
            ed25519.Ed25519PrivateKey.generate,
            lambda k: isinstance(k, ed25519.Ed25519PublicKey),
        ),
        Algorithm(
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp256",
            "ecdsa-p256",
            lambda: ec.generate_private_key(ec.SECP256R1()),
            _isCurve(ec.SECP256R1),
        ),
        Algorithm(
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp384",
            "ecdsa-p384",
            lambda: ec.generate_private_key(ec.SECP384R1()),
            _isCurve(ec.SECP384R1),
        ),
        Algorithm(
            "rsa-sha2-256",
            "ssh-rsa",
            "rsa-3072",
            lambda: rsa.generate_private_key(65537, 3072),
            _isStrongRSA,
        ),
    ]
}

#: Command-line names, as C{dwtrust keygen --algorithm} takes them.
SHORT_NAMES: dict[str, Algorithm] = {a.shortName: a for a in ALGORITHMS.values()}
SHORT_NAMES["rsa-4096"] = ALGORITHMS["rsa-sha2-256"]


def algorithmForKey(key: PublicKeyObject) -> Algorithm:
    """
    The one algorithm this key may be used with.

    @raise IdentityError: for a key type dwtrust does not accept (including
        RSA under 3072 bits).
    """
    for algorithm in ALGORITHMS.values():
        if algorithm.matches(key):
            return algorithm
    if isinstance(key, rsa.RSAPublicKey):
        raise IdentityError(
            f"RSA keys must have at least {MIN_RSA_BITS} bits, not {key.key_size}"
        )
    raise IdentityError(f"unsupported key type {type(key).__name__}")


@frozen(repr=False)
class PublicKey:
    """
    A public key and the algorithm it is used with.

    @ivar algorithm: the L{Algorithm}.
    @ivar blob: the key in OpenSSH wire format.
    """

    algorithm: Algorithm
    blob: bytes
    key: PublicKeyObject = field(repr=False, eq=False)

    def __repr__(self) -> str:
        return f"<PublicKey {self.algorithm.name} {self.fingerprint}>"

    @classmethod
    def fromKey(cls, key: PublicKeyObject) -> PublicKey:
        algorithm = algorithmForKey(key)
        line = key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(algorithm, base64.b64decode(line.split()[1]), key)

    @classmethod
    def fromWire(cls, algorithmName: str, blob: bytes) -> PublicKey:
        """
        Parse a key received from a peer, checking that it is well formed,
        canonically encoded and of the named algorithm.  Keys seen recently
        are not parsed again: the result is an immutable value.

        @raise IdentityError: if any of that is not so.
        """
        return _parseWire(algorithmName, blob)

    @classmethod
    def _fromWire(cls, algorithmName: str, blob: bytes) -> PublicKey:
        algorithm = ALGORITHMS.get(algorithmName)
        if algorithm is None:
            raise IdentityError(f"unsupported algorithm {algorithmName!r}")
        keyType, _ = _readSSHString(blob, 0)
        if keyType != algorithm.keyType.encode("ascii"):
            raise IdentityError(
                f"the algorithm {algorithmName!r} does not match a key of type"
                f" {keyType.decode('ascii', 'replace')!r}"
            )
        try:
            key = serialization.load_ssh_public_key(
                keyType + b" " + base64.b64encode(blob)
            )
        except (ValueError, TypeError, UnsupportedAlgorithm, NotImplementedError) as e:
            # cryptography raises NotImplementedError for, say, a compressed
            # elliptic-curve point; a peer's key must never escape as that.
            raise IdentityError(f"malformed public key: {e}") from None
        if not isinstance(
            key,
            (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey),
        ) or not algorithm.matches(key):
            raise IdentityError(
                f"the key is not a valid {algorithm.shortName} key"
                f" (RSA needs {MIN_RSA_BITS} bits or more)"
            )
        parsed = cls.fromKey(key)
        if parsed.blob != blob:
            raise IdentityError("the public key is not canonically encoded")
        return parsed

    @classmethod
    def fromOpenSSH(cls, line: str | bytes) -> PublicKey:
        """
        Parse an OpenSSH public-key line (C{"ssh-ed25519 AAAA... comment"}).

        @raise IdentityError: if it is malformed or of an unsupported type.
        """
        if isinstance(line, bytes):
            line = line.decode("ascii", "replace")
        parts = line.split()
        if len(parts) < 2:
            raise IdentityError("not an OpenSSH public-key line")
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise IdentityError("the public key is not valid base64") from None
        keyType, _ = _readSSHString(blob, 0)
        if keyType.decode("ascii", "replace") != parts[0]:
            raise IdentityError("the key type does not match the key")
        for algorithm in ALGORITHMS.values():
            if algorithm.keyType == parts[0]:
                return cls.fromWire(algorithm.name, blob)
        raise IdentityError(f"unsupported key type {parts[0]!r}")

    @property
    def fingerprint(self) -> str:
        """
        C{SHA256:} and the unpadded base64 SHA-256 of the blob, as
        C{ssh-keygen -lf} prints it.
        """
        return fingerprintOf(self.blob)

    def openssh(self, comment: str = "") -> str:
        """
        The OpenSSH public-key line.
        """
        line = f"{self.algorithm.keyType} {base64.b64encode(self.blob).decode()}"
        return f"{line} {comment}" if comment else line

    def verify(self, signature: bytes, data: bytes) -> bool:
        return self.algorithm.verify(self.key, signature, data)


@functools.lru_cache(maxsize=4096)
def _parseWire(algorithmName: str, blob: bytes) -> PublicKey:
    # Failures raise, and lru_cache keeps only successes.
    return PublicKey._fromWire(algorithmName, blob)


@functools.lru_cache(maxsize=8192)
def fingerprintOf(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


@frozen
class Identity:
    """
    A service's (or an owner's) identity: organization, service and key pair.

    The private key is never part of C{repr} and is never logged.
    """

    org: str = field(validator=lambda _, __, v: validateName("organization", v))
    service: str = field(validator=lambda _, __, v: validateName("service", v))
    privateKey: PrivateKey = field(repr=False, eq=False)
    publicKey: PublicKey = field(eq=True)

    @classmethod
    def generate(cls, org: str, service: str, algorithm: str = "ed25519") -> Identity:
        """
        Make a new identity with a fresh key pair.

        @param algorithm: a command-line name (C{ed25519}, C{ecdsa-p256},
            C{ecdsa-p384}, C{rsa-3072}, C{rsa-4096}).
        """
        validateName("organization", org)
        validateName("service", service)
        chosen = SHORT_NAMES.get(algorithm)
        if chosen is None:
            raise IdentityError(
                f"unknown algorithm {algorithm!r}; choose one of"
                f" {', '.join(sorted(SHORT_NAMES))}"
            )
        if algorithm == "rsa-4096":
            privateKey: PrivateKey = rsa.generate_private_key(65537, 4096)
        else:
            privateKey = chosen.generate()
        return cls.fromPrivateKey(org, service, privateKey)

    @classmethod
    def fromPrivateKey(cls, org: str, service: str, privateKey: PrivateKey) -> Identity:
        return cls(org, service, privateKey, PublicKey.fromKey(privateKey.public_key()))

    @property
    def name(self) -> str:
        return f"{self.org}/{self.service}"

    @property
    def algorithm(self) -> Algorithm:
        return self.publicKey.algorithm

    @property
    def fingerprint(self) -> str:
        return self.publicKey.fingerprint

    def sign(self, data: bytes) -> bytes:
        return self.algorithm.sign(self.privateKey, data)

    def save(self, directory: FilePath[str]) -> None:
        """
        Write this identity into C{directory}, which must hold no identity yet.
        The private key is written atomically with mode 0600.

        @raise IdentityError: if an identity is already there, or the
            directory cannot be made or written (with what to do about it).
        """
        try:
            os.stat(directory.path)
        except FileNotFoundError:
            try:
                directory.makedirs()
                directory.chmod(0o700)
            except OSError as e:
                raise _failedTo(
                    e, "create the identity directory", directory.path
                ) from None
        except OSError as e:
            raise _failedTo(e, "read the identity in", directory.path) from None
        if holdsIdentity(directory):
            raise IdentityError(f"{directory.path} already holds an identity")
        try:
            self._write(directory)
        except OSError as e:
            raise _failedTo(e, "write the identity into", directory.path) from None

    def _write(self, directory: FilePath[str]) -> None:
        # The private key goes last: its presence is what makes a directory
        # hold an identity, so a save cut short leaves one that can be saved
        # into again, not one that can be neither loaded nor replaced.
        writeAtomically(
            directory.child(PUBLIC_KEY_FILE),
            (self.publicKey.openssh(self.name) + "\n").encode("ascii"),
            0o644,
        )
        description = {
            "org": self.org,
            "service": self.service,
            "algorithm": self.algorithm.name,
        }
        writeAtomically(
            directory.child(IDENTITY_FILE),
            (json.dumps(description, indent=2) + "\n").encode("utf-8"),
            0o644,
        )
        privateBytes = self.privateKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        writeAtomically(directory.child(PRIVATE_KEY_FILE), privateBytes, 0o600)

    @classmethod
    def load(cls, directory: FilePath[str]) -> Identity:
        """
        Read an identity from C{directory}.

        @raise IdentityError: if it is missing, unreadable, inconsistent, or
            if the private key file can be read by anyone but its owner.
        """
        keyPath = directory.child(PRIVATE_KEY_FILE)
        if not holdsIdentity(directory):
            raise IdentityError(
                f"no identity in {directory.path}; create one with"
                " `dwtrust keygen --identity DIR --org ORG --service NAME`"
            )
        mode = stat.S_IMODE(os.stat(keyPath.path).st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"the private key {keyPath.path} has mode {mode:04o}; it must"
                " not be accessible by others (chmod 600)"
            )
        try:
            description = json.loads(directory.child(IDENTITY_FILE).getContent())
            org, service = description["org"], description["service"]
            loaded = serialization.load_ssh_private_key(keyPath.getContent(), None)
        except PermissionError as e:
            raise _failedTo(e, "read the identity in", directory.path) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IdentityError(
                f"cannot read the identity in {directory.path}: {e}"
            ) from None
        if not isinstance(
            loaded,
            (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey),
        ):
            raise IdentityError(f"unsupported key type in {keyPath.path}")
        identity = cls.fromPrivateKey(org, service, loaded)
        if description.get("algorithm") != identity.algorithm.name:
            raise IdentityError(
                f"{directory.child(IDENTITY_FILE).path} names the algorithm"
                f" {description.get('algorithm')!r} but the key is"
                f" {identity.algorithm.name}"
            )
        return identity

    @classmethod
    def loadOrCreate(
        cls,
        directory: FilePath[str],
        org: str | None,
        service: str | None,
        algorithm: str = "ed25519",
    ) -> tuple[Identity, bool]:
        """
        Load the identity in C{directory}, or create one there if it holds none
        and C{org} and C{service} are given.

        @return: the identity, and whether it was created.
        @raise IdentityError: if there is none and no names were given, or if
            the names given differ from the stored ones (an
            L{IdentityMismatch}).
        """
        if holdsIdentity(directory):
            identity = cls.load(directory)
            for kind, given, stored in [
                ("organization", org, identity.org),
                ("service", service, identity.service),
            ]:
                if given is not None and given != stored:
                    raise IdentityMismatch(
                        f"{directory.path} holds the identity {identity.name};"
                        f" the {kind} {given!r} given does not match"
                    )
            return identity, False
        if org is None or service is None:
            raise IdentityError(
                f"no identity in {directory.path}: give --org and --service to"
                " create one"
            )
        identity = cls.generate(org, service, algorithm)
        identity.save(directory)
        return identity, True


def writeAtomically(path: FilePath[str], content: bytes, mode: int) -> None:
    """
    Write C{content} to C{path} so that readers see either the old file or the
    whole new one, with C{mode} set before any byte is written.
    """
    temporary = path.siblingExtension(f".tmp{os.getpid()}")
    fd = os.open(temporary.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # The umask may have narrowed the mode; set it exactly.
            os.fchmod(f.fileno(), mode)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary.path, path.path)
    except BaseException:
        if temporary.exists():
            temporary.remove()
        raise
    directoryFD = os.open(path.parent().path, os.O_RDONLY)
    try:
        os.fsync(directoryFD)
    finally:
        os.close(directoryFD)


@frozen
class PeerIdentity:
    """
    Who is at the other end of an authenticated connection.

    @ivar org: the peer's organization.
    @ivar service: the peer's service name.
    @ivar publicKey: the key the peer proved it holds.
    """

    org: str
    service: str
    publicKey: PublicKey

    @property
    def name(self) -> str:
        return f"{self.org}/{self.service}"

    @property
    def algorithm(self) -> str:
        return self.publicKey.algorithm.name

    @property
    def fingerprint(self) -> str:
        return self.publicKey.fingerprint
