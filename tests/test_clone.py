"""
End to end, with real processes: new instances started from a running one
(seed S6).  An owner takes a join token from a running C{twistd dwtrust}
(C{dwtrust join-token}); a new instance redeems it (C{dwtrust clone}, or
C{twistd dwtrust --join-file}) over the running instance's control endpoint on
TCP loopback, and then serves as the same service, accepting the peers the
owners approved on the original.  A token works once; a used, lapsed,
forged or damaged token is refused, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dwtrust.provisioning import JoinToken

from .processes import (
    LOOPBACK,
    PRIVATE_KEY,
    STORE,
    Daemon,
    EchoServer,
    connect,
    describe,
    finish,
    keygen,
    run_cli,
    run_twistd,
    start_cli,
)

HELLO = b"hello\n"
LEDGER = "acme/ledger"


class _Original(Daemon):
    """
    The running instance, which tells its L{Site} where its control
    endpoint listens once it is entered.
    """

    def __init__(self, site: Site, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.site = site

    def __enter__(self) -> Daemon:
        entered = super().__enter__()
        # The listening port is the first TLS port bound, the control one
        # the second.
        self.site.control = f"{LOOPBACK}:{self.port_of('HandshakeFactory', 1)}"
        return entered


class Site:
    """
    One test's identities: the service C{acme/ledger}, its owner alice, a
    client billing, and a stranger; and the commands run with them.
    """

    def __init__(self, base: Path, made: dict[str, tuple[Path, str]]) -> None:
        self.base = base
        self.fingerprints = {}
        for name, (directory, fingerprint) in made.items():
            shutil.copytree(directory, base / name)
            self.fingerprints[name] = fingerprint
        #: The control endpoint's address, once the running instance bound
        #: it (see L{daemon}).
        self.control = ""
        self.audit = base / "audit.jsonl"

    def path(self, name: str) -> Path:
        return self.base / name

    def daemon(self, echo: EchoServer, name: str = "original", *extra: str) -> Daemon:
        """
        The running instance: acme/ledger, owned by alice, with its control
        endpoint on TCP loopback (port 0: its address is known once the
        instance is entered).
        """
        return _Original(
            self,
            self.base / name,
            "--identity",
            str(self.path("ledger")),
            "--owner",
            str(self.path("alice") / f"{PRIVATE_KEY}.pub"),
            "--control",
            f"tcp:0:interface={LOOPBACK}",
            "--forward",
            echo.forward,
            "--audit-log",
            str(self.audit),
            *extra,
        )

    def owner(self, command: str, *args: str, who: str = "alice") -> Any:
        return run_cli(
            command,
            "--control",
            self.control,
            "--identity",
            str(self.path(who)),
            *args,
        )

    def joinToken(self, *args: str) -> str:
        done = self.owner("join-token", *args)
        assert done.returncode == 0, describe(done)
        token: str = done.stdout.decode().strip()
        assert "\n" not in token, describe(done)
        return token

    def approve(self, name: str, daemon: Daemon) -> None:
        """
        Let C{name} in, the owners' way: it connects and is held; alice
        approves it; the held connection goes on.
        """
        held = start_cli(
            "connect", "--identity", str(self.path(name)), daemon.address, input=HELLO
        )
        daemon.wait_for_log(
            "control message approval_requested about "
            + self.fingerprints[name].replace("+", r"\+")
        )
        done = self.owner("approve", self.fingerprints[name])
        assert done.returncode == 0, describe(done)
        result = finish(held)
        assert (result.returncode, result.stdout) == (0, HELLO), describe(result)

    def audited(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    base = tmp_path_factory.mktemp("identities")
    names = {
        "ledger": ("acme", "ledger"),
        "alice": ("acme", "alice"),
        "billing": ("acme", "billing"),
        "stranger": ("acme", "stranger"),
    }
    return {
        name: (base / name, keygen(base / name, org, service))
        for name, (org, service) in names.items()
    }


@pytest.fixture
def site(tmp_path: Path, made: dict[str, tuple[Path, str]]) -> Site:
    return Site(tmp_path, made)


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


def clone(site: Site, token: str, directory: Path, *extra: str) -> Any:
    return run_cli(
        "clone",
        "--join",
        "-",
        "--identity",
        str(directory),
        *extra,
        input=token.encode(),
    )


def assertNothingWritten(directory: Path) -> None:
    """
    A refused clone left neither the directory nor a staging directory
    beside it.
    """
    assert not directory.exists(), sorted(os.listdir(directory))
    leftovers = [p for p in directory.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_cloneServesAsTheSameService(site: Site, echo: EchoServer) -> None:
    """
    A join token clones once: the new instance holds the service's key
    (0600), its owners and its decisions; started as a daemon, it serves as
    acme/ledger and accepts billing, approved on the original, with no
    approval asked; a stranger is still held for the owners.  The original
    logs the clone as an audit event naming the instance.
    """
    clonedDir = site.path("clone")
    with site.daemon(echo) as original:
        site.approve("billing", original)
        token = site.joinToken("--ttl", "10m")
        done = clone(site, token, clonedDir, "--instance", "ledger-2")
        assert done.returncode == 0, describe(done)
        assert f"joined {LEDGER}".encode() in done.stdout, describe(done)
        original.wait_for_log(r"instance ledger-2 at 127\.0\.0\.1:\d+ joined")

    key = clonedDir / PRIVATE_KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = run_cli("show", "--identity", str(clonedDir), "--json")
    assert shown.returncode == 0, describe(shown)
    facts = json.loads(shown.stdout)
    assert (facts["organization"], facts["service"]) == ("acme", "ledger")
    assert facts["fingerprint"] == site.fingerprints["ledger"]

    cloned = [e for e in site.audited() if e.get("event") == "dwtrust.join.cloned"]
    assert [e["instance"] for e in cloned] == ["ledger-2"], cloned
    assert all(token not in json.dumps(e) for e in site.audited())

    with Daemon(
        site.path("cloned-daemon"),
        "--identity",
        str(clonedDir),
        "--forward",
        echo.forward,
        "--control",
        f"unix:{clonedDir / 'control.sock'}",
    ) as copy:
        accepted = connect(site.path("billing"), copy.address, input=HELLO)
        assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
        assert "approval_requested" not in copy.log()
        held = start_cli(
            "connect",
            "--identity",
            str(site.path("stranger")),
            copy.address,
            input=HELLO,
        )
        copy.wait_for_log(
            "control message approval_requested about "
            + site.fingerprints["stranger"].replace("+", r"\+")
        )
        held.kill()
        finish(held)
        # The owners came along: alice is an owner of the copy too.
        pending = run_cli(
            "pending",
            "--control",
            f"unix:{clonedDir / 'control.sock'}",
            "--identity",
            str(site.path("alice")),
            "--json",
        )
        assert pending.returncode == 0, describe(pending)
        assert [
            e["peer"]["fingerprint"] for e in json.loads(pending.stdout)["pending"]
        ] == [site.fingerprints["stranger"]]


def test_tokenWorksOnce(site: Site, echo: EchoServer) -> None:
    """
    A second clone with the same token is refused, and writes nothing.
    """
    with site.daemon(echo) as original:
        token = site.joinToken()
        first = clone(site, token, site.path("first"))
        assert first.returncode == 0, describe(first)
        again = clone(site, token, site.path("second"))
        assert again.returncode == 3, describe(again)
        assert b"already used" in again.stderr, describe(again)
        original.wait_for_log("REFUSED a join .* already used")
    assertNothingWritten(site.path("second"))
    refused = [e for e in site.audited() if e.get("event") == "dwtrust.join.refused"]
    assert len(refused) == 1, refused


def test_expiredTokenRefused(site: Site, echo: EchoServer) -> None:
    """
    A token used after its life is refused, and writes nothing.
    """
    with site.daemon(echo):
        token = site.joinToken("--ttl", "1s")
        time.sleep(2.1)
        late = clone(site, token, site.path("late"))
    assert late.returncode == 3, describe(late)
    assert b"expired" in late.stderr, describe(late)
    assertNothingWritten(site.path("late"))


def test_forgedTokenRefused(site: Site, echo: EchoServer) -> None:
    """
    A token with the right instance and key but a secret the instance never
    issued is refused; one naming another key never reaches the secret
    stage (the clone refuses the instance); a damaged one fails to parse.
    Nothing is written in any case.
    """
    with site.daemon(echo):
        real = JoinToken.parse(site.joinToken())
        forged = JoinToken(
            real.endpoint, real.fingerprint, os.urandom(32), real.expires
        )
        refused = clone(site, forged.encode(), site.path("forged"))
        assert refused.returncode == 3, describe(refused)
        assert b"issued no such join token" in refused.stderr, describe(refused)

        other = JoinToken(
            real.endpoint, site.fingerprints["stranger"], real.secret, real.expires
        )
        wrongKey = clone(site, other.encode(), site.path("wrongkey"))
        assert wrongKey.returncode == 3, describe(wrongKey)
        assert b"identity_changed" in wrongKey.stderr, describe(wrongKey)

        damaged = clone(site, real.encode()[:-10], site.path("damaged"))
        assert damaged.returncode == 1, describe(damaged)
        assert b"damaged" in damaged.stderr, describe(damaged)

        # The real token was never spent by any of those.
        good = clone(site, real.encode(), site.path("good"))
        assert good.returncode == 0, describe(good)
    for name in ["forged", "wrongkey", "damaged"]:
        assertNothingWritten(site.path(name))


def test_onlyOwnersTakeTokens(site: Site, echo: EchoServer) -> None:
    """
    A key that is not an owner's may not take a join token.
    """
    with site.daemon(echo):
        done = site.owner("join-token", who="billing")
    assert done.returncode == 3, describe(done)
    assert b"not a registered owner" in done.stderr, describe(done)
    assert done.stdout == b"", describe(done)


def test_twistdJoin(site: Site, echo: EchoServer) -> None:
    """
    C{twistd dwtrust --join-file FILE} starts a new instance from the token
    and serves; started again with the same command line, it does not spend
    the token again, but runs on the key it has.
    """
    newDir = site.path("joined")
    with site.daemon(echo) as original:
        site.approve("billing", original)
        tokenFile = site.base / "token"
        tokenFile.write_text(site.joinToken() + "\n")
        tokenFile.chmod(0o600)
        options = (
            "--identity",
            str(newDir),
            "--join-file",
            str(tokenFile),
            "--forward",
            echo.forward,
            "--control",
            f"unix:{newDir / 'control.sock'}",
        )
        with Daemon(site.path("joined-daemon"), *options) as joined:
            accepted = connect(site.path("billing"), joined.address, input=HELLO)
            assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
            port = joined.port
        with Daemon(site.path("joined-daemon"), *options, port=port) as again:
            assert "already holds acme/ledger; the join token is not used" in (
                again.log()
            ), again.log()
            accepted = connect(site.path("billing"), again.address, input=HELLO)
            assert (accepted.status, accepted.stdout) == (0, HELLO), str(accepted)
    assert (newDir / STORE).exists()


def test_twistdJoinRefused(site: Site, echo: EchoServer) -> None:
    """
    C{twistd dwtrust --join-file} with a forged token exits with a one-line error
    and writes nothing.
    """
    with site.daemon(echo):
        real = JoinToken.parse(site.joinToken())
        forged = JoinToken(
            real.endpoint, real.fingerprint, os.urandom(32), real.expires
        )
        forgedFile = site.base / "forged"
        forgedFile.write_text(forged.encode())
        forgedFile.chmod(0o600)
        done = run_twistd(
            "-n",
            "--logfile",
            "-",
            "dwtrust",
            "--identity",
            str(site.path("nope")),
            # Not the default tcp:7443, which another program may hold.
            "--listen",
            f"tcp:0:interface={LOOPBACK}",
            "--join-file",
            str(forgedFile),
            cwd=site.base,
        )
    assert done.returncode == 1, describe(done)
    assert b"issued no such join token" in done.stderr + done.stdout, describe(done)
    assert b"Traceback" not in done.stderr + done.stdout, describe(done)
    assertNothingWritten(site.path("nope"))
