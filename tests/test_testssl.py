"""
The daemon's TLS as testssl.sh sees it, checked by C{tools/testssl-check}:
no protocol below TLS 1.2, forward secrecy for every suite, and no
finite-field Diffie-Hellman group.

The checks read testssl's JSON, never its exit status.  The first tests
feed them made-up findings, to show that each can fail; the slow test scans
real daemons (one RSA-3072, whose key could sign finite-field DHE suites, and
one Ed25519).  It does not skip: without testssl it fails, saying so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .processes import Daemon, EchoServer, keygen

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "testssl-check"


def loadScript() -> ModuleType:
    loader = SourceFileLoader("testssl_check", str(SCRIPT))
    spec = spec_from_loader("testssl_check", loader)
    assert spec is not None
    module = module_from_spec(spec)
    # Its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    loader.exec_module(module)
    return module


checker = loadScript()


def finding(id: str, text: str) -> dict[str, str]:
    return {"id": id, "ip": "127.0.0.1/127.0.0.1", "port": "7443", "finding": text}


def good() -> list[dict[str, str]]:
    """
    What testssl 3.0 reports for a dwtrust daemon with an RSA key.
    """
    return [
        finding("SSLv2", "not offered"),
        finding("SSLv3", "not offered"),
        finding("TLS1", "not offered"),
        finding("TLS1_1", "not offered"),
        finding("TLS1_2", "offered"),
        finding("TLS1_3", "offered with final"),
        finding("PFS", "offered"),
        finding(
            "PFS_ciphers",
            "TLS_AES_256_GCM_SHA384 ECDHE-RSA-AES256-GCM-SHA384",
        ),
        finding("PFS_ECDHE_curves", "prime256v1 secp384r1 X25519"),
        finding(
            "cipher_x1302",
            "x1302   TLS_AES_256_GCM_SHA384            ECDH 253   AESGCM"
            "      256      TLS_AES_256_GCM_SHA384",
        ),
        finding(
            "cipher_xc030",
            "xc030   ECDHE-RSA-AES256-GCM-SHA384       ECDH 253   AESGCM"
            "      256      TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        ),
    ]


def outcomes(entries: list[dict[str, str]]) -> dict[str, bool]:
    return {c.name: c.passed for c in checker.check(checker.Findings(entries))}


def without(entries: list[dict[str, str]], id: str) -> list[dict[str, str]]:
    return [e for e in entries if e["id"] != id]


def replaced(entries: list[dict[str, str]], id: str, text: str) -> list[dict[str, str]]:
    return [finding(id, text) if e["id"] == id else e for e in entries]


PROTOCOLS = "no protocol below TLS 1.2 is offered"
FS = "every cipher suite has forward secrecy"
FFDHE = "no finite-field DH group is accepted"


def test_goodFindingsPass() -> None:
    assert outcomes(good()) == {PROTOCOLS: True, FS: True, FFDHE: True}


def test_newerIdsPass() -> None:
    """
    testssl 3.1 and later say C{FS...} where 3.0 says C{PFS...}.
    """
    renamed = [dict(e, id=e["id"].removeprefix("P")) for e in good()]
    assert outcomes(renamed) == {PROTOCOLS: True, FS: True, FFDHE: True}


@pytest.mark.parametrize("protocol", ["SSLv2", "SSLv3", "TLS1", "TLS1_1"])
def test_oldProtocolOffered(protocol: str) -> None:
    assert not outcomes(replaced(good(), protocol, "offered"))[PROTOCOLS]


@pytest.mark.parametrize("protocol", ["SSLv3", "TLS1_1"])
def test_protocolFindingMissing(protocol: str) -> None:
    assert not outcomes(without(good(), protocol))[PROTOCOLS]


def test_noModernProtocol() -> None:
    entries = replaced(good(), "TLS1_2", "not offered")
    assert not outcomes(replaced(entries, "TLS1_3", "not offered"))[PROTOCOLS]


def test_suiteWithoutForwardSecrecy() -> None:
    entries = [
        *good(),
        finding(
            "cipher_x9c",
            "x9c     AES128-GCM-SHA256                 RSA        AESGCM"
            "      128      TLS_RSA_WITH_AES_128_GCM_SHA256",
        ),
    ]
    assert not outcomes(entries)[FS]


@pytest.mark.parametrize("id", ["PFS", "PFS_ciphers"])
def test_forwardSecrecyFindingMissing(id: str) -> None:
    assert not outcomes(without(good(), id))[FS]


def test_noSuitesListed() -> None:
    entries = [e for e in good() if not e["id"].startswith("cipher_")]
    assert not outcomes(entries)[FS]


def test_dhGroupAccepted() -> None:
    assert not outcomes([*good(), finding("DH_groups", "ffdhe2048")])[FFDHE]


def test_dheSuite() -> None:
    entries = replaced(
        good(),
        "PFS_ciphers",
        "TLS_AES_256_GCM_SHA384 ECDHE-RSA-AES256-GCM-SHA384 DHE-RSA-AES256-GCM-SHA384",
    )
    entries.append(
        finding(
            "cipher_x9f",
            "x9f     DHE-RSA-AES256-GCM-SHA384         DH 2048    AESGCM"
            "      256      TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
        )
    )
    result = outcomes(entries)
    assert not result[FFDHE]
    assert not result[FS]


def test_curvesFindingMissing() -> None:
    assert not outcomes(without(good(), "PFS_ECDHE_curves"))[FFDHE]


def test_ffdheNotTried() -> None:
    """
    Without TLS 1.3, testssl never offers the ffdhe groups on their own:
    the absence of C{DH_groups} proves nothing.
    """
    assert not outcomes(replaced(good(), "TLS1_3", "not offered"))[FFDHE]


def test_emptyJSON() -> None:
    assert outcomes([]) == {PROTOCOLS: False, FS: False, FFDHE: False}


# The real scan.


@pytest.fixture(scope="module")
def testssl() -> str:
    found = shutil.which("testssl") or shutil.which("testssl.sh")
    if found is None:
        pytest.fail(
            "the testssl command is missing: install the Debian package"
            " testssl.sh (./run-tests does)"
        )
    return found


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rsa-3072", "ed25519"])
def test_daemon(testssl: str, tmp_path: Path, algorithm: str) -> None:
    """
    testssl against a running daemon: every check passes, judged from its
    JSON findings, which the script's verdicts match.
    """
    keygen(tmp_path / "identity", "acme", "ledger", algorithm)
    jsonFile = tmp_path / "testssl.json"
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path / "daemon",
            "--identity",
            str(tmp_path / "identity"),
            "--forward",
            echo.forward,
        ) as daemon,
    ):
        done = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                daemon.address,
                "--json",
                str(jsonFile),
                "--testssl",
                testssl,
            ],
            capture_output=True,
            text=True,
            timeout=checker.SCAN_TIMEOUT + 60,
            check=False,
        )
    report = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert jsonFile.exists(), report
    entries: list[dict[str, Any]] = json.loads(jsonFile.read_text())
    findings = checker.Findings(entries)
    results = checker.check(findings)
    assert [(r.name, r.passed) for r in results] == [
        (PROTOCOLS, True),
        (FS, True),
        (FFDHE, True),
    ], "\n".join(r.line() for r in results)
    # The scan did reach the daemon's TLS: it saw suites and curves.
    assert findings.ciphers(), report
    assert (
        "X25519" in (findings.one("FS_ECDHE_curves", "PFS_ECDHE_curves") or ("", ""))[1]
    )
    for result in results:
        assert result.line() in done.stdout, report
    assert done.returncode == 0, report
    assert echo.connections() == 0
