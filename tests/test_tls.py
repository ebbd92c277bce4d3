"""
Tests for L{dwtrust._tls}: the TLS settings, and the two settings that rely on
pyOpenSSL's private binding.  If a pyOpenSSL release drops either binding,
these tests fail loudly rather than the settings silently not applying.
"""

from __future__ import annotations

import contextlib

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import Identity
from dwtrust._tls import (
    PREFERRED_GROUPS,
    TLS12_CIPHERS,
    TLSConfigurationError,
    channelOf,
    makeCertificate,
    makeContext,
    setGroups,
    usedExtendedMasterSecret,
)
from dwtrust._wire import ErrorCode, WireError

#: OpenSSL 3's SSL_OP_NO_EXTENDED_MASTER_SECRET (bit 0), which pyOpenSSL does
#: not name: a peer that will not use the extended master secret.
NO_EXTENDED_MASTER_SECRET = 1 << 0

SERVER = Identity.generate("acme", "ledger")
CLIENT = Identity.generate("acme", "billing")


def handshake(
    clientContext: SSL.Context, serverContext: SSL.Context
) -> tuple[SSL.Connection, SSL.Connection]:
    """
    Run a TLS handshake between two in-memory connections.

    @raise SSL.Error: if it fails.
    """
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    done = {client: False, server: False}
    for _ in range(20):
        for this, other in [(client, server), (server, client)]:
            if not done[this]:
                try:
                    this.do_handshake()
                    done[this] = True
                except SSL.WantReadError:
                    pass
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(this.bio_read(65536))
        if all(done.values()):
            # TLS 1.3: the server learns of the client's Finished last.
            for connection in (client, server):
                with contextlib.suppress(SSL.WantReadError):
                    connection.recv(1)
            return client, server
    raise AssertionError("the handshake did not finish")


class GroupsTests(SynchronousTestCase):
    """
    L{setGroups}, over C{SSL_CTX_set1_curves_list}.
    """

    def test_preferredGroupsSet(self) -> None:
        """
        The elliptic-curve groups are set, X25519, P-256 and P-384 at least,
        in order of preference.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        chosen = setGroups(context, PREFERRED_GROUPS)
        self.assertEqual(chosen[-3:], ("X25519", "P-256", "P-384"))
        self.assertEqual(list(chosen), [g for g in PREFERRED_GROUPS if g in chosen])

    def test_unknownGroupsRefused(self) -> None:
        """
        If OpenSSL knows none of the groups, that is an error, not a context
        left with its defaults (which include finite-field groups).
        """
        context = SSL.Context(SSL.TLS_METHOD)
        self.assertRaises(TLSConfigurationError, setGroups, context, ("nonsense",))

    def test_finiteFieldClientRefused(self) -> None:
        """
        A client offering only a finite-field group cannot complete a
        handshake with dwtrust's settings: the group list really applies.
        """
        client = makeContext(CLIENT)
        setGroups(client, ("ffdhe2048",))
        self.assertRaises(SSL.Error, handshake, client, makeContext(SERVER))

    def test_ellipticClientAccepted(self) -> None:
        """
        A client offering only P-384 completes the handshake in TLS 1.3.
        """
        client = makeContext(CLIENT)
        setGroups(client, ("P-384",))
        clientConnection, _ = handshake(client, makeContext(SERVER))
        self.assertEqual(clientConnection.get_protocol_version_name(), "TLSv1.3")


class ExtendedMasterSecretTests(SynchronousTestCase):
    """
    L{usedExtendedMasterSecret}, over C{SSL_get_extms_support}, and
    L{channelOf}'s refusal of TLS 1.2 without it.
    """

    def tls12(self, clientOptions: int = 0) -> tuple[SSL.Connection, SSL.Connection]:
        client = makeContext(CLIENT)
        client.set_max_proto_version(SSL.TLS1_2_VERSION)
        if clientOptions:
            client.set_options(clientOptions)
        return handshake(client, makeContext(SERVER))

    def test_tls12WithExtendedMasterSecret(self) -> None:
        """
        Two dwtrust peers on TLS 1.2 use the extended master secret, and the
        channel binds: both ends see the same exporter and each other's key.
        """
        client, server = self.tls12()
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.2")
        self.assertTrue(usedExtendedMasterSecret(client))
        self.assertTrue(usedExtendedMasterSecret(server))
        clientChannel, serverChannel = channelOf(client), channelOf(server)
        self.assertEqual(clientChannel.exporter, serverChannel.exporter)
        self.assertEqual(clientChannel.peerKey, SERVER.publicKey)
        self.assertEqual(serverChannel.peerKey, CLIENT.publicKey)

    def test_tls12WithoutExtendedMasterSecret(self) -> None:
        """
        Without the extended master secret, the exporter is not a sound
        channel binding, so the channel is refused with C{protocol_error}.
        """
        _client, server = self.tls12(NO_EXTENDED_MASTER_SECRET)
        self.assertFalse(usedExtendedMasterSecret(server))
        error = self.assertRaises(WireError, channelOf, server)
        self.assertEqual(error.code, ErrorCode.protocol_error)
        self.assertIn("extended master secret", error.message)

    def test_tls13Binds(self) -> None:
        """
        TLS 1.3 always binds, and both ends agree on the exporter.
        """
        client, server = handshake(makeContext(CLIENT), makeContext(SERVER))
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(channelOf(client).exporter, channelOf(server).exporter)


def serverRefusal(clientContext: SSL.Context, serverContext: SSL.Context) -> str:
    """
    Run a TLS handshake that the server must refuse; return the reason
    OpenSSL gave the server.

    @raise AssertionError: if the handshake completes, or the client gives
        up first (then the refusal is not the server's).
    """
    client = SSL.Connection(clientContext, None)
    client.set_connect_state()
    server = SSL.Connection(serverContext, None)
    server.set_accept_state()
    for _ in range(20):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as e:
            raise AssertionError(
                f"the client gave up first ({e}), the server having gone on"
                f" with {server.get_protocol_version_name()}"
            ) from None
        with contextlib.suppress(SSL.WantReadError):
            server.bio_write(client.bio_read(65536))
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as e:
            return " ".join(str(reason) for *_, reason in e.args[0])
        else:
            raise AssertionError(
                f"the server completed a {server.get_protocol_version_name()}"
                f" handshake with {server.get_cipher_name()}"
            )
        with contextlib.suppress(SSL.WantReadError):
            client.bio_write(server.bio_read(65536))
    raise AssertionError("the handshake neither finished nor failed")


#: Identities whose keys can sign in TLS 1.0 and 1.1 (Ed25519 cannot), so
#: that an old handshake, if allowed, would complete.
OLD_SERVER = Identity.generate("acme", "ledger", "ecdsa-p256")
OLD_CLIENT = Identity.generate("acme", "billing", "ecdsa-p256")


def oldClient(version: int) -> SSL.Context:
    """
    A client that offers only C{version}, with every cipher suite at
    security level 0 (so that the refusal cannot be its own), and a
    certificate (so that the server, were the version allowed, would
    complete the handshake).
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.set_cipher_list(b"ALL:@SECLEVEL=0")
    context.use_certificate(makeCertificate(OLD_CLIENT))
    context.use_privatekey(OLD_CLIENT.privateKey)
    return context


class MinimumVersionTests(SynchronousTestCase):
    """
    TLS 1.2 is the minimum version: the context refuses TLS 1.0 and 1.1 for
    their version.

    OpenSSL 3 and later also refuse versions below 1.2 at their default
    security level (1 and up), and dwtrust's TLS 1.2 suites do not exist in
    older versions, so a handshake against the unmodified context cannot
    tell whether the minimum is set.  These tests take the other two
    barriers away (security level 0, as an operator's C{openssl.cnf} can
    set, and then every suite too) and check that the minimum alone refuses
    the old versions, for their version.
    """

    def serverContext(self, ciphers: bytes) -> SSL.Context:
        context = makeContext(OLD_SERVER)
        context.set_cipher_list(ciphers + b":@SECLEVEL=0")
        return context

    def assertRefusedForVersion(self, ciphers: bytes) -> None:
        for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
            reason = serverRefusal(oldClient(version), self.serverContext(ciphers))
            self.assertEqual(reason, "unsupported protocol", hex(version))

    def test_oldVersionsRefusedAtSecurityLevel0(self) -> None:
        """
        With the security level at 0, a TLS 1.0 or 1.1 client is refused
        because of its version (not for want of a shared suite).
        """
        self.assertRefusedForVersion(TLS12_CIPHERS)

    def test_oldVersionsRefusedWithEverySuite(self) -> None:
        """
        Even with every suite allowed at security level 0 (so that only the
        minimum version stands in the way), TLS 1.0 and 1.1 are refused.
        """
        self.assertRefusedForVersion(b"ALL")

    def test_tls12Accepted(self) -> None:
        """
        The same lowered contexts still complete TLS 1.2 (so the refusals
        above are about the version, not a broken context).
        """
        client = makeContext(OLD_CLIENT)
        client.set_max_proto_version(SSL.TLS1_2_VERSION)
        for ciphers in (TLS12_CIPHERS, b"ALL"):
            clientConnection, _ = handshake(client, self.serverContext(ciphers))
            self.assertEqual(clientConnection.get_protocol_version_name(), "TLSv1.2")
