"""
The TLS settings: ECDHE only, with a self-signed certificate made in memory
from the identity key.

- TLS 1.2 at minimum; for TLS 1.2 only ECDHE suites with AEAD ciphers, and only
  with the extended master secret (RFC 7627), without which the exporter value
  is not a sound channel binding.
- TLS 1.3 key exchange limited to elliptic-curve groups: the hybrid
  X25519MLKEM768 first where OpenSSL has it, then X25519, P-256 and P-384.  A
  peer offering only finite-field groups fails the handshake.
- No session resumption (no stateless tickets, no session cache; the TLS 1.3
  tickets OpenSSL still sends name sessions nothing keeps) and no
  renegotiation:
  every connection presents its certificate and runs a full key exchange.
- The dwtrust protocol version is negotiated with ALPN (ids L{ALPN_IDS}),
  inside the TLS handshake: a client offers its versions, newest first, and
  a server picks the newest it speaks too.  A side that speaks version 1
  only sends and selects no ALPN at all, exactly as before version 2.
- Certificates are not checked against any authority.  They carry the key that
  the dwtrust proof must then be made with; the proof, bound to the exporter
  value, is what authenticates the peer.

Two settings have no public pyOpenSSL API; each is one small function here,
tested in C{tests/test_tls.py} so that a pyOpenSSL release that breaks it fails
loudly.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Callable

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from ._identity import Identity, IdentityError, PublicKey
from ._limits import DEFAULT_MAX_CERTIFICATE
from ._wire import EXPORTER_LABEL, EXPORTER_SIZE, VERSIONS, ErrorCode, WireError

#: Key-exchange groups, most preferred first.
PREFERRED_GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")
#: TLS 1.2 suites: ECDHE key exchange and an AEAD cipher, nothing else.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
#: The ALPN protocol id of each dwtrust version.
ALPN_IDS = {2: b"dwtrust/2", 1: b"dwtrust/1"}
_ALPN_VERSIONS = {alpn: version for version, alpn in ALPN_IDS.items()}


class TLSConfigurationError(Exception):
    """
    OpenSSL refused a setting dwtrust depends on.
    """


def setGroups(context: SSL.Context, groups: tuple[str, ...]) -> tuple[str, ...]:
    """
    Limit the key-exchange groups of C{context} to C{groups}, dropping any this
    OpenSSL build does not know.

    pyOpenSSL has no public API for a group list (only C{set_tmp_ecdh}, which
    sets one curve), so this calls OpenSSL's C{SSL_CTX_set1_curves_list}
    through pyOpenSSL's private binding.

    @return: the groups that were set.
    @raise TLSConfigurationError: if none of them could be set.
    """
    from OpenSSL._util import lib  # private: see the docstring

    available = tuple(
        g for g in groups if lib.SSL_CTX_set1_curves_list(context._context, g.encode())
    )
    if not available or not lib.SSL_CTX_set1_curves_list(
        context._context, ":".join(available).encode()
    ):
        raise TLSConfigurationError(f"OpenSSL accepts none of the groups {groups}")
    return available


def usedExtendedMasterSecret(connection: SSL.Connection) -> bool:
    """
    Whether this TLS 1.2 connection negotiated the extended master secret.

    pyOpenSSL has no public API for it, so this calls OpenSSL's
    C{SSL_get_extms_support} through pyOpenSSL's private binding.
    """
    from OpenSSL._util import lib  # private: see the docstring

    return bool(lib.SSL_get_extms_support(connection._ssl) == 1)


def makeCertificate(identity: Identity) -> x509.Certificate:
    """
    A self-signed certificate for C{identity}'s key, made in memory.  Nothing
    checks its names or dates; it carries the key.
    """
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.org),
            x509.NameAttribute(NameOID.COMMON_NAME, identity.service),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    algorithm = (
        None
        if isinstance(identity.privateKey, ed25519.Ed25519PrivateKey)
        else hashes.SHA256()
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.privateKey.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(identity.privateKey, algorithm)
    )


def _acceptAnyCertificate(
    connection: SSL.Connection, certificate: object, errno: int, depth: int, ok: int
) -> bool:
    # The certificate is not what authenticates the peer: the dwtrust proof,
    # made with the certificate's key and bound to this connection, is.
    return True


def checkVersions(versions: tuple[int, ...]) -> tuple[int, ...]:
    """
    Check a tuple of dwtrust versions to offer, preferred first.

    @raise ValueError: if it is empty, repeats one, or names one not spoken.
    """
    if not versions or len(set(versions)) != len(versions):
        raise ValueError(f"versions must name each version once: {versions!r}")
    unknown = [v for v in versions if v not in VERSIONS]
    if unknown:
        raise ValueError(
            f"dwtrust version {unknown[0]!r} is not one of {VERSIONS} spoken here"
        )
    return versions


def _alpnSelector(
    versions: tuple[int, ...],
) -> Callable[[SSL.Connection, list[bytes]], bytes | object]:
    """
    The server's ALPN choice: the first of C{versions} the client offers, or
    none at all (the connection is then version 1).
    """
    preferred = [ALPN_IDS[v] for v in versions]

    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
        for alpn in preferred:
            if alpn in offered:
                return alpn
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def makeContext(
    identity: Identity, versions: tuple[int, ...] = VERSIONS
) -> SSL.Context:
    """
    An OpenSSL context for either role, configured as the module describes.
    As a server, it selects the newest of C{versions} the client offers by
    ALPN; with C{versions=(1,)} it does no ALPN (as before version 2).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_cipher_list(TLS12_CIPHERS)
    setGroups(context, PREFERRED_GROUPS)
    context.set_options(
        SSL.OP_NO_TICKET
        | SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_RENEGOTIATION
    )
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Idle connections give their read and write buffers back (as Twisted's
    # CertificateOptions does): about 30 KiB per connection.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.use_certificate(makeCertificate(identity))
    context.use_privatekey(identity.privateKey)
    context.check_privatekey()
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _acceptAnyCertificate
    )
    if versions != (1,):
        context.set_alpn_select_callback(_alpnSelector(versions))  # type: ignore[arg-type]
    return context


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class ConnectionCreator:
    """
    Makes OpenSSL connections for L{TLSMemoryBIOProtocol}, from one context
    built once per identity.

    @ivar versions: the dwtrust versions offered (as a client) and selected
        (as a server), preferred first; C{(1,)} offers no ALPN.
    """

    def __init__(
        self, identity: Identity, versions: tuple[int, ...] = VERSIONS
    ) -> None:
        self.versions = checkVersions(versions)
        self._context = makeContext(identity, self.versions)
        self._offer = (
            [] if self.versions == (1,) else [ALPN_IDS[v] for v in self.versions]
        )

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._offer:
            connection.set_alpn_protos(self._offer)
        return connection


@frozen
class Channel:
    """
    What the handshake takes from the finished TLS layer.

    @ivar exporter: the RFC 9266 C{tls-exporter} value of this connection.
    @ivar peerKey: the key in the peer's certificate.
    @ivar version: the TLS version, such as C{"TLSv1.3"}.
    @ivar protocol: the dwtrust version negotiated by ALPN (1 when none was).
    @ivar peerNames: the organization and service the peer's certificate
        names, if it names both: a claim, proved by nothing (the proof
        proves names), for looking up what is known about its key.
    """

    exporter: bytes
    peerKey: PublicKey
    version: str
    protocol: int = 1
    peerNames: tuple[str, str] | None = None


#: Certificate keys remembered, at most (the least recently used forgotten).
KEY_CACHE_SIZE = 4096
_keys: OrderedDict[bytes, tuple[PublicKey, tuple[str, str] | None]] = OrderedDict()


def _names(certificate: x509.Certificate) -> tuple[str, str] | None:
    """
    The organization and service a certificate's subject names, if exactly
    one of each.
    """
    subject = certificate.subject
    org = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    service = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(org) != 1 or len(service) != 1:
        return None
    values = (org[0].value, service[0].value)
    if not all(isinstance(v, str) for v in values):
        return None
    return (str(values[0]), str(values[1]))


def _certificateKey(der: bytes) -> tuple[PublicKey, tuple[str, str] | None]:
    """
    The key of a certificate, given as DER, and the names it claims.  The
    same peers connect again and again with the same certificate, so it is
    not parsed again each time.
    The cache is keyed by the certificate's SHA-256 digest, not its bytes, so
    an entry costs the same whatever the peer sent (its size is bounded
    before this, too); failures are not cached.
    """
    digest = hashlib.sha256(der).digest()
    known = _keys.get(digest)
    if known is not None:
        _keys.move_to_end(digest)
        return known
    certificate = x509.load_der_x509_certificate(der)
    key = PublicKey.fromKey(certificate.public_key())  # type: ignore[arg-type]
    known = _keys[digest] = (key, _names(certificate))
    if len(_keys) > KEY_CACHE_SIZE:
        _keys.popitem(last=False)
    return known


def clearKeyCache() -> None:
    """
    Forget every remembered certificate key.
    """
    _keys.clear()


def _peerCertificate(connection: SSL.Connection, maxCertificate: int) -> bytes:
    """
    The DER of the one certificate the peer presented.

    @raise WireError: (C{protocol_error}) if it presented none, more than one,
        or one larger than C{maxCertificate} bytes.
    """
    certificate = connection.get_peer_certificate()
    if certificate is None:
        raise WireError(ErrorCode.protocol_error, "the peer sent no certificate")
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
    if len(der) > maxCertificate:
        raise WireError(
            ErrorCode.protocol_error,
            f"the certificate is {len(der)} bytes; at most {maxCertificate}"
            " are accepted",
        )
    # A client's chain leaves out its certificate, a server's includes it:
    # either way, nothing else may be in it.
    chain = connection.get_peer_cert_chain() or []
    others = [
        c for c in chain if crypto.dump_certificate(crypto.FILETYPE_ASN1, c) != der
    ]
    if others or len(chain) > 1:
        raise WireError(
            ErrorCode.protocol_error,
            f"the peer presented {len(others) + 1} certificates; exactly one is"
            " accepted",
        )
    return der


def channelOf(
    connection: SSL.Connection, maxCertificate: int = DEFAULT_MAX_CERTIFICATE
) -> Channel:
    """
    Read the channel binding and the peer's certificate key from a connection
    whose TLS handshake has finished.

    @param maxCertificate: bytes of the peer's certificate, at most.
    @raise WireError: if the connection cannot be bound (TLS 1.2 without the
        extended master secret), or the peer did not present exactly one
        certificate of at most C{maxCertificate} bytes with an acceptable key.
    """
    version = connection.get_protocol_version_name()
    if version != "TLSv1.3" and not usedExtendedMasterSecret(connection):
        raise WireError(
            ErrorCode.protocol_error,
            f"{version} without the extended master secret cannot be bound",
        )
    der = _peerCertificate(connection, maxCertificate)
    try:
        peerKey, peerNames = _certificateKey(der)
    except (IdentityError, ValueError) as e:
        raise WireError(
            ErrorCode.bad_signature, f"the certificate key is not acceptable: {e}"
        ) from None
    exporter = connection.export_keying_material(EXPORTER_LABEL, EXPORTER_SIZE, b"")
    return Channel(exporter, peerKey, version, negotiatedVersion(connection), peerNames)


def negotiatedVersion(connection: SSL.Connection) -> int:
    """
    The dwtrust version ALPN selected on a connection whose TLS handshake has
    finished: 1 if it selected none (a peer that speaks version 1 only).
    """
    return _ALPN_VERSIONS.get(connection.get_alpn_proto_negotiated(), 1)
