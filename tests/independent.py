"""
dwtrust protocol version 2 built from the specification alone, with
C{cryptography} and pyOpenSSL and without importing dwtrust: the test vectors
are derived with it (C{tests/test_vectors.py}), and the raw attackers of
C{tests/test_attacks_v2.py} speak it.

- Fields, frames, signed payloads and proofs (C{docs/protocol.rst}).
- L{RawTLS}: one end of a TLS connection over a blocking loopback socket,
  with a self-signed certificate for any key and any ALPN offer or choice,
  which sends and reads whatever bytes a test scripts.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

T = TypeVar("T")

#: The label that begins every signed payload.
LABEL = b"dwtrust-handshake-proof"
#: The RFC 9266 exporter label and size.
EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
EXPORTER_SIZE = 32
#: Frame types.
HELLO, CHALLENGE, PROOF, ACCEPT, ERROR = 1, 2, 3, 4, 5
#: ALPN protocol ids.
ALPN = {2: b"dwtrust/2", 1: b"dwtrust/1"}

HEADER = struct.Struct("!BBH")


def field(value: bytes) -> bytes:
    """
    C{u16(len(value)) || value}.
    """
    return struct.pack("!H", len(value)) + value


def fields(*values: bytes) -> bytes:
    return b"".join(field(v) for v in values)


def frame(version: int, kind: int, body: bytes) -> bytes:
    """
    A frame: version, type, body length, body.
    """
    return HEADER.pack(version, kind, len(body)) + body


def payload(
    version: int,
    role: str,
    org: str,
    service: str,
    algorithm: str,
    blob: bytes,
    exporter: bytes,
    challenge: bytes | None = None,
) -> bytes:
    """
    The signed payload: 8 fields in version 2; version 1 has the challenge
    before the exporter (9 fields).
    """
    parts = [
        LABEL,
        bytes([version]),
        role.encode("ascii"),
        org.encode("utf-8"),
        service.encode("utf-8"),
        algorithm.encode("ascii"),
        blob,
    ]
    if challenge is not None:
        parts.append(challenge)
    parts.append(exporter)
    return fields(*parts)


def proofBody(org: str, service: str, algorithm: str, blob: bytes, sig: bytes) -> bytes:
    """
    The five proof fields of a C{PROOF} (and of a version 2 C{ACCEPT}).
    """
    return fields(
        org.encode("utf-8"), service.encode("utf-8"), algorithm.encode(), blob, sig
    )


def algorithmOf(key: PrivateKey) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ssh-ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ecdsa-sha2-nistp{key.curve.key_size}"
    return "rsa-sha2-256"


def blobOf(key: PrivateKey) -> bytes:
    """
    The OpenSSH wire-format blob of C{key}'s public key.
    """
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return base64.b64decode(line.split(b" ")[1])


def sign(key: PrivateKey, data: bytes) -> bytes:
    """
    The signature of C{data} in the form C{key}'s algorithm calls for.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
        return key.sign(data, ec.ECDSA(digest))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def proofFor(
    key: PrivateKey,
    version: int,
    role: str,
    org: str,
    service: str,
    exporter: bytes,
    challenge: bytes | None = None,
) -> bytes:
    """
    The five proof fields made honestly by C{key} for C{org/service}.
    """
    algorithm, blob = algorithmOf(key), blobOf(key)
    signed = payload(version, role, org, service, algorithm, blob, exporter, challenge)
    return proofBody(org, service, algorithm, blob, sign(key, signed))


def decodeFields(body: bytes) -> list[bytes]:
    """
    Split a frame body into its fields (which must fill it exactly).
    """
    out = []
    while body:
        (size,) = struct.unpack("!H", body[:2])
        assert len(body) >= 2 + size, "a field runs past the body"
        out.append(body[2 : 2 + size])
        body = body[2 + size :]
    return out


# TLS


def certificateFor(key: PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw")])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )


def context(
    key: PrivateKey,
    maxVersion: int | None = None,
    offer: list[bytes] | None = None,
    choose: Callable[[list[bytes]], bytes] | None = None,
) -> SSL.Context:
    """
    A TLS context with a certificate for C{key} that accepts any peer
    certificate; as a client it offers ALPN C{offer} (none if C{None}), as a
    server it picks with C{choose} (no ALPN callback if C{None}).
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    if maxVersion is not None:
        ctx.set_max_proto_version(maxVersion)
    ctx.use_certificate(certificateFor(key))
    ctx.use_privatekey(key)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    if offer is not None:
        ctx.set_alpn_protos(offer)
    if choose is not None:

        def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
            return choose(offered)

        ctx.set_alpn_select_callback(select)
    return ctx


class Closed(Exception):
    """
    The peer closed the connection.
    """


class RawTLS:
    """
    One end of a TLS connection over a non-blocking socket, used as if it
    were blocking: each operation waits at most C{wait} seconds.
    """

    def __init__(
        self, connection: SSL.Connection, sock: socket.socket, wait: float
    ) -> None:
        self.connection = connection
        self.sock = sock
        self.wait = wait
        self.closed = False
        self._buffer = b""

    @classmethod
    def connect(
        cls,
        port: int,
        key: PrivateKey,
        offer: list[bytes] | None = None,
        maxVersion: int | None = None,
        wait: float = 60.0,
    ) -> RawTLS:
        """
        Dial C{127.0.0.1:port} and run the TLS handshake as a client.
        """
        sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
        sock.setblocking(False)
        connection = SSL.Connection(context(key, maxVersion, offer=offer), sock)
        connection.set_connect_state()
        tls = cls(connection, sock, wait)
        tls._io(connection.do_handshake)
        return tls

    @classmethod
    def accept(
        cls,
        listener: socket.socket,
        key: PrivateKey,
        choose: Callable[[list[bytes]], bytes] | None = None,
        wait: float = 60.0,
    ) -> RawTLS:
        """
        Accept one connection on C{listener} and run the TLS handshake as a
        server.
        """
        listener.settimeout(wait)
        sock, _ = listener.accept()
        sock.setblocking(False)
        connection = SSL.Connection(context(key, choose=choose), sock)
        connection.set_accept_state()
        tls = cls(connection, sock, wait)
        tls._io(connection.do_handshake)
        return tls

    def _io(self, operation: Callable[[], T]) -> T:
        """
        Run C{operation} until it no longer wants to read or write, for at
        most C{wait} seconds.
        """
        deadline = time.monotonic() + self.wait
        while True:
            try:
                return operation()
            except SSL.WantReadError:
                readers, writers = [self.sock], []
            except SSL.WantWriteError:
                readers, writers = [], [self.sock]
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(readers, writers, [], left)):
                raise AssertionError(
                    f"the peer neither sent nor closed within {self.wait} seconds"
                )

    def exporter(self) -> bytes:
        return self.connection.export_keying_material(
            EXPORTER_LABEL, EXPORTER_SIZE, b""
        )

    def alpn(self) -> bytes:
        return self.connection.get_alpn_proto_negotiated()

    def send(self, data: bytes) -> None:
        while data:
            sent = self._io(lambda chunk=data: self.connection.send(chunk))
            data = data[sent:]

    def _more(self, wait: bool = True) -> None:
        if self.closed:
            raise Closed("closed before")
        try:
            if wait:
                data = self._io(lambda: self.connection.recv(65536))
            else:
                data = self.connection.recv(65536)
        except SSL.WantReadError:
            raise
        except (SSL.Error, OSError) as e:
            self.closed = True
            raise Closed(str(e)) from None
        if not data:
            self.closed = True
            raise Closed("end of stream")
        self._buffer += data

    def poll(self) -> bool:
        """
        Read what has arrived, without waiting: whether any bytes did, or the
        peer closed.
        """
        try:
            self._more(wait=False)
        except SSL.WantReadError:
            return False
        except Closed:
            return True
        return True

    def readExactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._more()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def readFrame(self) -> tuple[int, int, bytes]:
        """
        The next frame: its version, type and body.
        """
        version, kind, size = HEADER.unpack(self.readExactly(4))
        return version, kind, self.readExactly(size)

    def readAll(self) -> bytes:
        """
        Every byte until the peer closes.
        """
        while True:
            try:
                self._more()
            except Closed:
                data, self._buffer = self._buffer, b""
                return data

    def frames(self) -> list[tuple[int, int, bytes]]:
        """
        Every frame until the peer closes (bytes after the last whole frame
        are dropped).
        """
        data = self.readAll()
        out = []
        while len(data) >= 4:
            version, kind, size = HEADER.unpack(data[:4])
            if len(data) < 4 + size:
                break
            out.append((version, kind, data[4 : 4 + size]))
            data = data[4 + size :]
        return out

    def close(self) -> None:
        with contextlib.suppress(SSL.Error, OSError):
            self.connection.shutdown()
        self.sock.close()
