"""
The daemon's TLS, as an outside client sees it: the real C{openssl s_client}
against real C{twistd dwtrust} daemons on 127.0.0.1.

Two daemons run for the whole module, one with an RSA-3072 identity and one
with an Ed25519 identity, so that a refused cipher suite is refused for its
key exchange or cipher, and not because the server's key cannot sign for it.

What "refused" means here: s_client exits non-zero, negotiated nothing
(C{Cipher is (NONE)}), and reports the alert it received from the server,
so the refusal came from the daemon and not from s_client itself.

What "completes" means: s_client, presenting a client certificate (the daemon
requires one), negotiated the expected protocol, suite and group; received
no alert; and got back the daemon's dwtrust C{ERROR} frame
(C{version_unsupported}) in answer to the plain-text line it sent.  The daemon
can only answer over TLS once its own side of the handshake, including the
check of the client's certificate, is done, so this shows the handshake
completed on both sides (and that dwtrust, not TLS, then refused the client).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from attrs import frozen

from .processes import LOOPBACK, Daemon, EchoServer, keygen

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
#: s_client sends this line once connected; the daemon reads its first byte,
#: C{G}, as a dwtrust frame header of version 71 and answers with an error.
PROBE = b"GET /\n"
#: The error code of the daemon's answer to L{PROBE}.
ANSWER = "version_unsupported"
FFDHE = "ffdhe2048:ffdhe3072:ffdhe4096:ffdhe6144:ffdhe8192"
#: The server key algorithms of the module's daemons.
SERVERS = ["rsa-3072", "ed25519"]


@frozen
class Certificate:
    cert: Path
    key: Path


@frozen
class SClient:
    """
    What one run of C{openssl s_client} did.
    """

    status: int
    out: str
    err: str

    def negotiated(self) -> list[tuple[str, str]]:
        """
        The (protocol, cipher) of each C{New, ..., Cipher is ...} line.
        """
        return re.findall(r"^New, (\S+), Cipher is (\S+)$", self.out, re.M)

    def __str__(self) -> str:
        return (
            f"s_client exited {self.status}\n"
            f"--- stdout:\n{self.out}\n--- stderr:\n{self.err}"
        )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """
    A self-signed P-256 client certificate and key, made by C{openssl req}.
    """
    base = tmp_path_factory.mktemp("client-cert")
    made = subprocess.run(
        [
            OPENSSL,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/O=outsiders/CN=openssl",
            "-days",
            "1",
            "-keyout",
            str(base / "key.pem"),
            "-out",
            str(base / "cert.pem"),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr.decode(errors="replace")
    return Certificate(base / "cert.pem", base / "key.pem")


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """
    A running daemon for each algorithm in L{SERVERS}, forwarding to an echo
    server (which nothing here should ever reach).
    """
    base = tmp_path_factory.mktemp("openssl")
    for algorithm in SERVERS:
        keygen(base / algorithm, "acme", f"ledger-{algorithm}", algorithm)
    with (
        EchoServer(base / "echo") as echo,
        Daemon(
            base / "d-rsa",
            "--identity",
            str(base / "rsa-3072"),
            "--forward",
            echo.forward,
        ) as rsa,
        Daemon(
            base / "d-ed25519",
            "--identity",
            str(base / "ed25519"),
            "--forward",
            echo.forward,
        ) as ed25519,
    ):
        yield {"rsa-3072": rsa, "ed25519": ed25519}
        assert echo.connections() == 0


def sClient(
    daemon: Daemon,
    *options: str,
    certificate: Certificate | None = None,
    input: bytes = PROBE,
    waitForServer: bool = True,
) -> SClient:
    """
    Run C{openssl s_client} against C{daemon} with C{options}; it sends
    C{input} and, if C{waitForServer}, waits for the server to close rather
    than quitting at the end of its input.
    """
    assert Path(OPENSSL).exists(), "the openssl command is needed, and missing"
    command = [OPENSSL, "s_client", "-connect", f"{LOOPBACK}:{daemon.port}"]
    if certificate is not None:
        command += ["-cert", str(certificate.cert), "-key", str(certificate.key)]
    done = subprocess.run(
        [*command, *(["-ign_eof"] if waitForServer else []), *options],
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return SClient(
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


def assertRefused(result: SClient, alert: str) -> None:
    """
    The daemon refused the TLS handshake with C{alert}: nothing was
    negotiated and no dwtrust byte came back.
    """
    assert result.status != 0, str(result)
    assert result.negotiated() == [("(NONE)", "(NONE)")], str(result)
    assert f"alert {alert}" in result.err, str(result)
    assert ANSWER not in result.out, str(result)


def assertCompleted(result: SClient, protocol: str) -> str:
    """
    The TLS handshake completed on both sides with C{protocol}, and the
    daemon answered over it.

    @return: the negotiated cipher suite.
    """
    assert result.status == 0, str(result)
    negotiated = result.negotiated()
    assert len(negotiated) == 1 and negotiated[0][0] == protocol, str(result)
    assert "alert" not in result.err, str(result)
    assert ANSWER in result.out, str(result)
    return negotiated[0][1]


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("groups", ["ffdhe2048", FFDHE])
def test_tls13FiniteFieldGroupsRefused(
    daemons: dict[str, Daemon], certificate: Certificate, server: str, groups: str
) -> None:
    """
    A TLS 1.3 client that offers only finite-field groups is refused.
    """
    result = sClient(
        daemons[server], "-tls1_3", "-groups", groups, certificate=certificate
    )
    assertRefused(result, "handshake failure")


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize(
    ("group", "shown"),
    [
        ("X25519", "Server Temp Key: X25519"),
        ("P-256", "Server Temp Key: ECDH, prime256v1"),
        ("P-384", "Server Temp Key: ECDH, secp384r1"),
    ],
)
def test_tls13EllipticCurveGroup(
    daemons: dict[str, Daemon],
    certificate: Certificate,
    server: str,
    group: str,
    shown: str,
) -> None:
    """
    A TLS 1.3 client that offers one elliptic-curve group (X25519, P-256 or
    P-384) completes the handshake with it.
    """
    result = sClient(
        daemons[server], "-tls1_3", "-groups", group, certificate=certificate
    )
    assert assertCompleted(result, "TLSv1.3").startswith("TLS_"), str(result)
    assert shown in result.out, str(result)


@pytest.mark.parametrize("server", SERVERS)
def test_tls13WithoutClientCertificate(daemons: dict[str, Daemon], server: str) -> None:
    """
    Without a client certificate, a TLS 1.3 client finishes its own side of
    the handshake (s_client reports a cipher), but the daemon then refuses
    it with C{certificate required} and sends it nothing else.
    """
    result = sClient(daemons[server], "-tls1_3", "-groups", "X25519")
    assert result.status != 0, str(result)
    assert [p for p, _ in result.negotiated()] == ["TLSv1.3"], str(result)
    assert "alert certificate required" in result.err, str(result)
    assert ANSWER not in result.out, str(result)


@pytest.mark.parametrize("server", SERVERS)
def test_tls11Refused(
    daemons: dict[str, Daemon], certificate: Certificate, server: str
) -> None:
    """
    TLS 1.1 is refused by the daemon (the client is allowed to offer it,
    with its own security level lowered, so the refusal is the server's).
    OpenSSL's default security level refuses it too, so this alone does not
    show that the daemon sets a minimum version: see
    L{test_oldVersionsRefusedAtSecurityLevel0}.
    """
    result = sClient(
        daemons[server],
        "-tls1_1",
        "-cipher",
        "DEFAULT@SECLEVEL=0",
        certificate=certificate,
    )
    assertRefused(result, "protocol version")


#: An OpenSSL configuration that lowers the security level to 0 and allows
#: TLS 1.0, as an operator's C{openssl.cnf} can: OpenSSL itself then lets the
#: old versions through, and only dwtrust's own minimum stands in the way.
LOW_SECURITY = """\
openssl_conf = openssl_init

[openssl_init]
ssl_conf = ssl_section

[ssl_section]
system_default = system_default_section

[system_default_section]
CipherString = ALL:@SECLEVEL=0
MinProtocol = TLSv1
"""

#: Run with this configuration, a context made as the daemon's but without
#: the minimum version: prints the reason a TLS 1.1 client is refused.
WITHOUT_MINIMUM = """\
from OpenSSL import SSL
from dwtrust._tls import makeContext
from tests.test_tls import OLD_SERVER, oldClient, serverRefusal

server = makeContext(OLD_SERVER)
server.set_min_proto_version(0)
print(serverRefusal(oldClient(SSL.TLS1_1_VERSION), server))
"""


@pytest.fixture(scope="module")
def lowSecurity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A file with the L{LOW_SECURITY} configuration.
    """
    path = tmp_path_factory.mktemp("low-security") / "openssl.cnf"
    path.write_text(LOW_SECURITY)
    return path


@pytest.fixture(scope="module")
def lowSecurityDaemon(
    tmp_path_factory: pytest.TempPathFactory, lowSecurity: Path
) -> Iterator[Daemon]:
    """
    A daemon with an RSA-3072 identity (whose key can sign in TLS 1.0 and
    1.1), run with the L{LOW_SECURITY} configuration.
    """
    base = tmp_path_factory.mktemp("openssl-low-security")
    keygen(base / "identity", "acme", "ledger-low", "rsa-3072")
    with (
        EchoServer(base / "echo") as echo,
        Daemon(
            base / "daemon",
            "--identity",
            str(base / "identity"),
            "--forward",
            echo.forward,
            env={"OPENSSL_CONF": str(lowSecurity)},
        ) as daemon,
    ):
        yield daemon
        assert echo.connections() == 0


@pytest.mark.parametrize("configured", [True, False])
def test_lowSecurityConfigurationApplies(lowSecurity: Path, configured: bool) -> None:
    """
    L{LOW_SECURITY} really lowers the security level of the OpenSSL that
    dwtrust uses, so that L{test_oldVersionsRefusedAtSecurityLevel0} tests
    the minimum version and nothing else: without it, a context made as
    the daemon's but with no minimum version refuses TLS 1.1 only for want
    of a shared suite; at the default security level, for its version.
    """
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}
    if configured:
        env["OPENSSL_CONF"] = str(lowSecurity)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(root), env.get("PYTHONPATH", "")] if p
    )
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MINIMUM],
        capture_output=True,
        cwd=root,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    expected = "no shared cipher" if configured else "unsupported protocol"
    assert done.stdout.decode().strip() == expected


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_oldVersionsRefusedAtSecurityLevel0(
    lowSecurityDaemon: Daemon, certificate: Certificate, version: str
) -> None:
    """
    On a machine whose OpenSSL configuration lowers the security level to 0
    and allows TLS 1.0, the daemon still refuses TLS 1.0 and 1.1 for their
    version (C{protocol version}), by its own TLS 1.2 minimum.  Without the
    minimum it would refuse them for want of a shared suite (C{handshake
    failure}); against OpenSSL's default security level, as in
    L{test_tls11Refused}, the two cannot be told apart.
    """
    result = sClient(
        lowSecurityDaemon,
        version,
        "-cipher",
        "ALL:@SECLEVEL=0",
        certificate=certificate,
    )
    assertRefused(result, "protocol version")


def test_tls12FiniteFieldDHERefused(
    daemons: dict[str, Daemon], certificate: Certificate
) -> None:
    """
    TLS 1.2 with only finite-field DHE suites is refused, by a server whose
    RSA key could sign for them.
    """
    result = sClient(
        daemons["rsa-3072"], "-tls1_2", "-cipher", "kDHE", certificate=certificate
    )
    assertRefused(result, "handshake failure")


@pytest.mark.parametrize("server", SERVERS)
def test_tls12FiniteFieldGroupsRefused(
    daemons: dict[str, Daemon], certificate: Certificate, server: str
) -> None:
    """
    TLS 1.2 with ECDHE suites but only finite-field groups is refused.
    """
    result = sClient(
        daemons[server],
        "-tls1_2",
        "-cipher",
        "ECDHE",
        "-groups",
        FFDHE,
        certificate=certificate,
    )
    assertRefused(result, "handshake failure")


NON_AEAD = {
    "rsa-3072": ["ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"],
    "ed25519": ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"],
}
AEAD = {
    "rsa-3072": ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"],
    "ed25519": ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
}


@pytest.mark.parametrize(
    ("server", "suite"), [(s, c) for s in SERVERS for c in NON_AEAD[s]]
)
def test_tls12NonAEADRefused(
    daemons: dict[str, Daemon], certificate: Certificate, server: str, suite: str
) -> None:
    """
    A TLS 1.2 ECDHE suite without an AEAD cipher (CBC with HMAC) is refused,
    though the server's key suits it.
    """
    result = sClient(
        daemons[server], "-tls1_2", "-cipher", suite, certificate=certificate
    )
    assertRefused(result, "handshake failure")


@pytest.mark.parametrize(
    ("server", "suite"), [(s, c) for s in SERVERS for c in AEAD[s]]
)
def test_tls12AEADSuite(
    daemons: dict[str, Daemon], certificate: Certificate, server: str, suite: str
) -> None:
    """
    Each ECDHE suite with an AEAD cipher that the server's key suits
    completes the handshake with that suite.
    """
    result = sClient(
        daemons[server], "-tls1_2", "-cipher", suite, certificate=certificate
    )
    assert assertCompleted(result, "TLSv1.2") == suite


@pytest.mark.parametrize("server", SERVERS)
def test_tls12ECDHE(
    daemons: dict[str, Daemon], certificate: Certificate, server: str
) -> None:
    """
    A TLS 1.2 client offering every ECDHE suite, AEAD or not, completes the
    handshake with an AEAD one, an elliptic-curve group, and the extended
    master secret (without which dwtrust cannot bind to the session).
    """
    result = sClient(
        daemons[server], "-tls1_2", "-cipher", "ECDHE", certificate=certificate
    )
    suite = assertCompleted(result, "TLSv1.2")
    aead = r"ECDHE-(RSA|ECDSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)"
    assert re.fullmatch(aead, suite), str(result)
    assert "Server Temp Key: X25519" in result.out, str(result)
    assert "Extended master secret: yes" in result.out, str(result)


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("protocol", ["-tls1_2", "-tls1_3"])
def test_noResumption(
    daemons: dict[str, Daemon], certificate: Certificate, server: str, protocol: str
) -> None:
    """
    Sessions are never resumed: when s_client reconnects offering its
    session, every one of its connections is a full handshake.
    """
    result = sClient(
        daemons[server],
        protocol,
        "-reconnect",
        certificate=certificate,
        input=b"",
        waitForServer=False,
    )
    assert result.status == 0, str(result)
    negotiated = result.negotiated()
    assert len(negotiated) == 6, str(result)
    assert not re.search(r"^Reused,", result.out, re.M), str(result)
