"""
The status, health and metrics endpoint (C{twistd dwtrust --status}): its
parts in process (the histogram, the exposition format, loopback by
default, C{/healthz} with a store that is down), and a real daemon scraped
over HTTP while real clients are accepted, held and refused.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dwtrust import Identity
from dwtrust._status import (
    LATENCY_BUCKETS,
    MAX_STATUS_CONNECTIONS,
    STATUS_IDLE_TIMEOUT,
    DaemonStatus,
    Exposition,
    Histogram,
    StatusResource,
    loopbackByDefault,
    statusSite,
)
from dwtrust.store import StoreUnavailable

from .processes import (
    DEADLINE,
    PRIVATE_KEY,
    Daemon,
    EchoServer,
    describe,
    finish,
    run_cli,
    run_twistd,
    start_cli,
    start_session,
    wait_for,
)

HELLO = b"hello\n"


# Helpers shared with test_reload and test_allow.


def make_identity(directory: Path, org: str, service: str) -> Identity:
    """
    A new identity saved in C{directory}, with its C{id_dwtrust.pub}.
    """
    identity = Identity.generate(org, service)
    identity.save(FilePath(str(directory)))
    return identity


def public_key(directory: Path) -> str:
    return str(directory / f"{PRIVATE_KEY}.pub")


def ledger_daemon(tmp_path: Path, forward: str, *options: str) -> Daemon:
    """
    A daemon for the identity in C{tmp_path/ledger}, forwarding to
    C{forward}, with C{options}.
    """
    return Daemon(
        tmp_path / "d",
        "--identity",
        str(tmp_path / "ledger"),
        "--forward",
        forward,
        *options,
    )


def status_url(daemon: Daemon) -> str:
    """
    The base URL of a daemon's status endpoint, from its log.
    """
    match = daemon.wait_for_log(r"status, health and metrics on http://(\S+)/status")
    return f"http://{match.group(1)}"


def get(url: str) -> tuple[int, str, str]:
    """
    GET C{url}: the status, the content type and the body.
    """
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as response:
            return (
                response.status,
                response.headers["Content-Type"],
                response.read().decode(),
            )
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(daemon: Daemon) -> dict[str, float]:
    """
    The daemon's C{/metrics}, as a mapping of each sample (name and labels,
    as written) to its value.
    """
    status, kind, body = get(status_url(daemon) + "/metrics")
    assert status == 200, body
    assert kind == "text/plain; version=0.0.4; charset=utf-8", kind
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def wait_for_metric(daemon: Daemon, sample: str, value: float) -> dict[str, float]:
    """
    Scrape until C{sample} has C{value}; return that scrape.
    """
    seen: list[dict[str, float]] = []

    def reached() -> dict[str, float] | None:
        seen.append(scrape(daemon))
        return seen[-1] if seen[-1].get(sample) == value else None

    return wait_for(
        reached,
        f"{sample} to be {value}",
        why=lambda: f"last scrape: {seen[-1] if seen else None}\n{daemon.report()}",
    )


def pending_ids(control: str, owner: Path) -> list[str]:
    """
    The ids of the pending requests, from C{dwtrust pending --json}.
    """
    done = run_cli("pending", "--json", "--control", control, "--identity", str(owner))
    assert done.returncode == 0, describe(done)
    listing: dict[str, Any] = json.loads(done.stdout)
    return [e.get("requestId") or e["id"] for e in listing["pending"]]


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[EchoServer]:
    with EchoServer(tmp_path / "echo") as server:
        yield server


# In process.


class HistogramTests(SynchronousTestCase):
    def test_cumulative(self) -> None:
        """
        Each bucket counts the observations at or below its bound, and
        C{+Inf} counts them all; the sum and count follow.
        """
        histogram = Histogram()
        for seconds in (0.001, 0.005, 0.2, 1000.0):
            histogram.observe(seconds)
        buckets = dict(histogram.cumulative())
        self.assertEqual(buckets["0.005"], 2)
        self.assertEqual(buckets["0.1"], 2)
        self.assertEqual(buckets["0.25"], 3)
        self.assertEqual(buckets["300.0"], 3)
        self.assertEqual(buckets["+Inf"], 4)
        self.assertEqual(len(buckets), len(LATENCY_BUCKETS) + 1)
        self.assertEqual(histogram.count, 4)
        self.assertAlmostEqual(histogram.total, 1000.206)


class ExpositionTests(SynchronousTestCase):
    def test_format(self) -> None:
        """
        A metric is its HELP and TYPE lines, then its samples with the
        C{dwtrust_} prefix; label values are escaped.
        """
        out = Exposition()
        out.metric("things", "gauge", "Things.", [({"kind": 'a"b\\c'}, 2)])
        self.assertEqual(
            out.text().decode(),
            "# HELP dwtrust_things Things.\n"
            "# TYPE dwtrust_things gauge\n"
            'dwtrust_things{kind="a\\"b\\\\c"} 2\n',
        )


class LoopbackTests(SynchronousTestCase):
    def test_tcpWithoutInterface(self) -> None:
        """
        A C{tcp} description that names no interface listens on 127.0.0.1,
        a C{tcp6} one on ::1.
        """
        self.assertEqual(
            loopbackByDefault("tcp:9100", reactor), "tcp:9100:interface=127.0.0.1"
        )
        self.assertEqual(
            loopbackByDefault("tcp6:9100", reactor), "tcp6:9100:interface=\\:\\:1"
        )

    def test_interfaceKept(self) -> None:
        """
        A description that names an interface, or is not TCP, is kept.
        """
        for description in ("tcp:9100:interface=0.0.0.0", "unix:/run/s.sock"):
            self.assertEqual(loopbackByDefault(description, reactor), description)


class StatusSiteTests(SynchronousTestCase):
    def test_connectionsBounded(self) -> None:
        """
        The status endpoint takes at most L{MAX_STATUS_CONNECTIONS}
        connections at once; more are closed at once, and a place freed is
        given again.  Idle connections are closed after
        L{STATUS_IDLE_TIMEOUT} seconds.
        """
        site = statusSite(None)  # type: ignore[arg-type]
        address = IPv4Address("TCP", "127.0.0.1", 1)
        built = []
        for _ in range(MAX_STATUS_CONNECTIONS):
            protocol = site.buildProtocol(address)
            assert protocol is not None
            protocol.makeConnection(StringTransport())
            built.append(protocol)
        self.assertIsNone(site.buildProtocol(address))
        built.pop(0).connectionLost(Failure(ConnectionDone()))
        another = site.buildProtocol(address)
        assert another is not None
        another.makeConnection(StringTransport())
        built.append(another)
        for protocol in built:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(site.wrappedFactory.timeOut, STATUS_IDLE_TIMEOUT)  # type: ignore[attr-defined]


class _Store:
    def __init__(self, pending: Deferred[list[object]]) -> None:
        self._pending = pending

    def pending(self) -> Deferred[list[object]]:
        return self._pending


class _Owners:
    owners: list[object] = []


def _render(store: _Store, path: bytes) -> DummyRequest:
    identity = Identity.generate("acme", "ledger")
    status = DaemonStatus(
        identity,
        "1.0",
        store,  # type: ignore[arg-type]
        _Owners(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        lambda: 0.0,
    )
    request = DummyRequest([path.strip(b"/")])
    request.path = path
    StatusResource(status).render(request)
    return request


class HealthTests(SynchronousTestCase):
    def test_storeUnavailable(self) -> None:
        """
        C{/healthz} answers 503 while the store is unavailable, and
        C{/status} says so; 200 "ok" when it answers.
        """
        down = _Store(fail(StoreUnavailable("the database is down")))
        request = _render(down, b"/healthz")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(b"".join(request.written), b"the trust store is unavailable\n")
        request = _render(_Store(fail(StoreUnavailable("down"))), b"/status")
        body = json.loads(b"".join(request.written))
        self.assertEqual(body["store"], {"available": False, "pending": None})
        request = _render(_Store(succeed([object()])), b"/healthz")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(b"".join(request.written), b"ok\n")


# A real daemon, scraped over HTTP.


def test_statusOffByDefault(tmp_path: Path, echo: EchoServer) -> None:
    """
    Without C{--status} the daemon serves no status endpoint.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    with ledger_daemon(tmp_path, echo.forward) as daemon:
        assert "status, health and metrics" not in daemon.log()
        assert [p for name, p in daemon.bound_ports() if name == "Site"] == []


def test_statusAndHealth(tmp_path: Path, echo: EchoServer) -> None:
    """
    C{GET /status} is JSON with the identity, its fingerprint, the version,
    the uptime, the addresses listened on (the status endpoint on
    127.0.0.1, since C{tcp:0} names no interface), the owners and the
    store; C{/healthz} says ok; other paths are 404 and other methods 405.
    Nothing secret is served.
    """
    ledger = make_identity(tmp_path / "ledger", "acme", "ledger")
    make_identity(tmp_path / "alice", "acme", "alice")
    with ledger_daemon(
        tmp_path,
        echo.forward,
        "--owner",
        public_key(tmp_path / "alice"),
        "--status",
        "tcp:0",
    ) as daemon:
        url = status_url(daemon)
        assert url.startswith("http://127.0.0.1:"), url
        code, kind, body = get(url + "/status")
        assert (code, kind) == (200, "application/json"), body
        status = json.loads(body)
        assert status["identity"] == "acme/ledger"
        assert status["fingerprint"] == ledger.fingerprint
        assert re.fullmatch(r"\d+\.\d+.*", status["version"]), status
        assert status["uptime"] >= 0
        assert status["owners"] == 1
        assert status["store"] == {"available": True, "pending": 0}
        roles = {entry["role"]: entry["address"] for entry in status["listening"]}
        assert roles["listen"] == daemon.address, status
        assert roles["status"] == url.removeprefix("http://"), status
        assert roles["control"].startswith("unix:"), status
        assert get(url + "/healthz")[:3] == (200, "text/plain; charset=utf-8", "ok\n")
        assert get(url + "/nothing")[0] == 404
        posted = urllib.request.Request(url + "/status", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(posted, timeout=DEADLINE)
        assert refused.value.code == 405
        everything = body + get(url + "/metrics")[2]
    private = (tmp_path / "ledger" / PRIVATE_KEY).read_text()
    for line in private.splitlines()[1:-1]:
        assert line not in everything


def test_badStatusEndpoint(tmp_path: Path) -> None:
    """
    A C{--status} that is no endpoint description stops the daemon with
    one line that names the option, and no traceback.
    """
    done = run_twistd(
        "-n",
        "--pidfile",
        str(tmp_path / "d.pid"),
        "--logfile",
        str(tmp_path / "d.log"),
        "dwtrust",
        "--identity",
        str(tmp_path / "ledger"),
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--status",
        "nonsense:1",
        cwd=tmp_path,
    )
    assert done.returncode != 0, describe(done)
    assert b"--status: bad endpoint description" in done.stderr, describe(done)
    assert b"Traceback" not in done.stderr + done.stdout, describe(done)


def test_metricsMove(tmp_path: Path, echo: EchoServer) -> None:
    """
    The counters move as real clients are accepted, held and refused: a
    key on the allow list is accepted at once (and its decision timed); an
    unknown key is held (an open, held connection, with bytes held for it,
    and a pending request) until an owner denies it, and then counts as
    refused with the reason C{denied}; C{dwtrust pending} opens a control
    connection.
    """
    make_identity(tmp_path / "ledger", "acme", "ledger")
    alice = tmp_path / "alice"
    make_identity(alice, "acme", "alice")
    make_identity(tmp_path / "billing", "acme", "billing")
    make_identity(tmp_path / "payroll", "acme", "payroll")
    control = f"unix:{tmp_path / 'ledger' / 'control.sock'}"
    with ledger_daemon(
        tmp_path,
        echo.forward,
        "--owner",
        public_key(alice),
        "--allow",
        public_key(tmp_path / "billing"),
        "--status",
        "tcp:0",
    ) as daemon:
        before = scrape(daemon)
        accepted = 'dwtrust_handshakes_total{outcome="accepted"}'
        assert before[accepted] == 0
        assert before["dwtrust_decision_seconds_count"] == 0
        assert before["dwtrust_connections_open"] == 0
        assert before["dwtrust_store_available"] == 1
        assert before["dwtrust_owners"] == 1

        done = run_cli(
            "connect",
            "--identity",
            str(tmp_path / "billing"),
            daemon.address,
            input=HELLO,
        )
        assert done.returncode == 0 and done.stdout == HELLO, describe(done)
        after = wait_for_metric(daemon, accepted, 1)
        assert after["dwtrust_decision_seconds_count"] == 1
        assert after['dwtrust_decision_seconds_bucket{le="+Inf"}'] == 1

        # A client that has pinned the service (protocol version 2 connects
        # its application, whose bytes the daemon then holds, only then).
        pinned = run_cli(
            "pin",
            "--identity",
            str(tmp_path / "payroll"),
            daemon.address,
            public_key(tmp_path / "ledger"),
        )
        assert pinned.returncode == 0, describe(pinned)
        held = start_cli(
            "connect",
            "--identity",
            str(tmp_path / "payroll"),
            daemon.address,
            input=HELLO,
        )
        wait_for_metric(daemon, "dwtrust_connections_held", 1)
        holding = wait_for_metric(daemon, "dwtrust_pending_requests", 1)
        assert holding["dwtrust_connections_held"] == 1
        assert holding["dwtrust_connections_open"] == 1
        assert holding["dwtrust_connections_untrusted"] == 1
        wait_for_metric(daemon, "dwtrust_held_bytes", len(HELLO))
        [requestId] = pending_ids(control, alice)
        denied = run_cli(
            "deny", "--control", control, "--identity", str(alice), requestId
        )
        assert denied.returncode == 0, describe(denied)
        assert finish(held).returncode != 0
        refused = wait_for_metric(
            daemon, 'dwtrust_handshakes_total{outcome="refused",reason="denied"}', 1
        )
        assert refused["dwtrust_connections_held"] == 0
        assert refused["dwtrust_pending_requests"] == 0
        assert refused[accepted] == 1
        assert refused["dwtrust_decision_seconds_count"] == 2
        wait_for_metric(daemon, "dwtrust_connections_open", 0)
        assert refused["dwtrust_held_bytes"] == 0

        assert refused["dwtrust_control_connections"] == 0
        watching = start_session(
            "watch", "--control", control, "--identity", str(alice)
        )
        try:
            wait_for_metric(daemon, "dwtrust_control_connections", 1)
        finally:
            watching.kill()
            watching.wait(timeout=DEADLINE)
        wait_for_metric(daemon, "dwtrust_control_connections", 0)
