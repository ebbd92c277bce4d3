"""
End to end, with real processes: a service router asks for the service's key
(seed S7).  C{dwtrust request-key} waits on the service's control endpoint
while the owners are asked; an owner's C{dwtrust approve} releases the key to
that router alone, which then serves as the service in front of several
instances (C{--forward} twice, round-robin).  A denial, the router going
away, or the request lapsing release nothing: nothing on the router's disk,
no key in its output, and no delivery in the service's audit log.
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .processes import (
    COMMAND_TIMEOUT,
    DWTRUST,
    PRIVATE_KEY,
    Daemon,
    EchoServer,
    Lines,
    connect,
    describe,
    keygen,
)
from .test_clone import HELLO, Site, made  # noqa: F401 (a fixture)

#: Where request-key puts the service's identity by default.
SERVICE_DIR = ("services", "acme", "ledger")


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("router")
    return base / "router", keygen(base / "router", "acme", "edge-router")


class RouterSite(Site):
    def __init__(
        self,
        base: Path,
        identities: dict[str, tuple[Path, str]],
        router: tuple[Path, str],
    ) -> None:
        super().__init__(base, {**identities, "router": router})

    def requestKey(self, *extra: str) -> tuple[subprocess.Popen[bytes], Lines]:
        """
        Start C{dwtrust request-key} as the router; return it, and its
        standard error as it comes.
        """
        process = subprocess.Popen(
            [
                DWTRUST,
                "request-key",
                "--identity",
                str(self.path("router")),
                *extra,
                self.control,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return process, Lines(process.stderr)

    def keyRequests(self) -> list[dict[str, Any]]:
        done = self.owner("pending", "--json")
        assert done.returncode == 0, describe(done)
        return [
            e
            for e in json.loads(done.stdout)["pending"]
            if e.get("kind") == "key_request"
        ]

    def waitForRequest(self, daemon: Daemon) -> str:
        """
        Wait until the router's request is listed; return its id.
        """
        daemon.wait_for_log(r"asks for acme/ledger's key \(request")
        requests = self.keyRequests()
        assert len(requests) == 1, requests
        peer = requests[0]["peer"]
        assert peer["fingerprint"] == self.fingerprints["router"], requests
        assert peer["organization"] == "acme" and peer["service"] == "edge-router"
        requestId: str = requests[0]["requestId"]
        return requestId

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.audited() if e.get("event") == name]

    def assertNothingDelivered(self, done: subprocess.CompletedProcess[bytes]) -> None:
        assert not (self.path("router") / "services").exists(), list(
            (self.path("router") / "services").rglob("*")
        )
        transcript = done.stdout + done.stderr
        assert b"PRIVATE KEY" not in transcript, describe(done)
        assert self.events("dwtrust.key_request.delivered") == []
        assert self.events("dwtrust.key_request.released") == []


def finishRequest(
    process: subprocess.Popen[bytes], errors: Lines
) -> subprocess.CompletedProcess[bytes]:
    """
    Wait for C{dwtrust request-key}; what it did, with all it wrote to its
    standard error (which L{Lines} collected).
    """
    # Not finish(): its communicate() would race the Lines thread for
    # standard error.
    output = Lines(process.stdout)
    try:
        process.wait(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            f"{process.args!r} did not finish; errors so far: {errors.text()}"
        ) from None
    output.join()
    errors.join()
    return subprocess.CompletedProcess(
        process.args, process.returncode, output.text().encode(), errors.text().encode()
    )


@pytest.fixture
def site(
    tmp_path: Path,
    made: dict[str, tuple[Path, str]],  # noqa: F811
    router: tuple[Path, str],
) -> RouterSite:
    return RouterSite(tmp_path, made, router)


@pytest.fixture
def echoes(tmp_path: Path) -> Iterator[tuple[EchoServer, EchoServer]]:
    with (
        EchoServer(tmp_path / "echo1") as one,
        EchoServer(tmp_path / "echo2") as two,
    ):
        yield one, two


def test_releaseDeliversTheKey(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    The router's request waits for the owners; alice's approval releases the
    key to it, written 0600 under the router's identity; the router then
    serves as acme/ledger in front of two instances, in turn, and accepts
    billing, whom the owners approved on the service.  The request, the
    release and the delivery are audit events.
    """
    one, two = echoes
    with site.daemon(one) as service:
        site.approve("billing", service)
        process, errors = site.requestKey("--instance", "edge-1")
        requestId = site.waitForRequest(service)
        errors.wait_for(rf"request {requestId}\); waiting for them")
        approved = site.owner("approve", "--reason", "edge rollout", requestId[:6])
        assert approved.returncode == 0, describe(approved)
        assert b"released acme/ledger's key to acme/edge-router" in approved.stdout
        done = finishRequest(process, errors)
        assert done.returncode == 0, describe(done)
        assert site.keyRequests() == []

    serviceDir = site.path("router").joinpath(*SERVICE_DIR)
    assert f"identity is in {serviceDir}".encode() in done.stdout, describe(done)
    assert stat.S_IMODE((serviceDir / PRIVATE_KEY).stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in done.stdout + done.stderr
    for name in [
        "dwtrust.key_request.received",
        "dwtrust.key_request.released",
        "dwtrust.key_request.delivered",
    ]:
        events = site.events(name)
        assert len(events) == 1, (name, events)
        assert events[0]["fingerprint"] == site.fingerprints["router"]
    assert site.events("dwtrust.key_request.received")[0]["instance"] == "edge-1"

    with Daemon(
        site.path("router-daemon"),
        "--identity",
        str(serviceDir),
        "--forward",
        one.forward,
        "--forward",
        two.forward,
        "--control",
        f"unix:{serviceDir / 'control.sock'}",
    ) as front:
        for _ in range(4):
            through = connect(site.path("billing"), front.address, input=HELLO)
            assert (through.status, through.stdout) == (0, HELLO), str(through)
        assert "approval_requested" not in front.log()
    # Round-robin: each instance got every other connection.
    assert (one.connections(), two.connections()) == (3, 2)


def test_denialDeliversNothing(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    An owner's denial ends the request: the router is told, and gets
    nothing.
    """
    with site.daemon(echoes[0]) as service:
        process, errors = site.requestKey()
        requestId = site.waitForRequest(service)
        denied = site.owner("deny", "--reason", "not this one", requestId)
        assert denied.returncode == 0, describe(denied)
        assert b"withheld acme/ledger's key from acme/edge-router" in denied.stdout
        done = finishRequest(process, errors)
        assert site.keyRequests() == []
    assert done.returncode == 3, describe(done)
    assert b"an owner withheld the key: not this one" in done.stderr, describe(done)
    site.assertNothingDelivered(done)
    assert len(site.events("dwtrust.key_request.withheld")) == 1


def test_disconnectDeliversNothing(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    A router that goes away withdraws its request: it is no longer listed,
    and an approval given afterwards has nothing to release.
    """
    with site.daemon(echoes[0]) as service:
        process, errors = site.requestKey()
        requestId = site.waitForRequest(service)
        process.send_signal(signal.SIGKILL)
        done = finishRequest(process, errors)
        service.wait_for_log(rf"key request {requestId} is withdrawn")
        assert site.keyRequests() == []
        late = site.owner("approve", requestId)
        assert late.returncode == 1, describe(late)
        assert b"no pending request or known key matches" in late.stderr
    site.assertNothingDelivered(done)
    assert len(site.events("dwtrust.key_request.withdrawn")) == 1


def test_lapsedRequestDeliversNothing(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    A request nobody answers lapses with the daemon's request TTL.
    """
    with site.daemon(echoes[0], "original", "--request-ttl", "2"):
        process, errors = site.requestKey()
        done = finishRequest(process, errors)
    assert done.returncode == 3, describe(done)
    assert b"lapsed without an answer" in done.stderr, describe(done)
    site.assertNothingDelivered(done)
    assert len(site.events("dwtrust.key_request.expired")) == 1


def test_routerCannotApproveItself(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    The router is no owner: its own approval of its request is refused, and
    the request still waits.
    """
    with site.daemon(echoes[0]) as service:
        process, errors = site.requestKey()
        requestId = site.waitForRequest(service)
        selfApproved = site.owner("approve", requestId, who="router")
        assert selfApproved.returncode == 3, describe(selfApproved)
        assert b"not a registered owner" in selfApproved.stderr
        assert [r["requestId"] for r in site.keyRequests()] == [requestId]
        process.send_signal(signal.SIGKILL)
        done = finishRequest(process, errors)
    site.assertNothingDelivered(done)


def test_existingTargetRefusedFirst(
    site: RouterSite, echoes: tuple[EchoServer, EchoServer]
) -> None:
    """
    A target directory that already holds an identity is refused before the
    owners are bothered.
    """
    target = site.path("router").joinpath(*SERVICE_DIR)
    keygen(target, "acme", "ledger")
    with site.daemon(echoes[0]) as service:
        process, errors = site.requestKey()
        done = finishRequest(process, errors)
        assert not re.search(r"asks for acme/ledger's key", service.log())
    assert done.returncode == 1, describe(done)
    assert b"already holds an identity" in done.stderr, describe(done)
