"""
Tests for the benchmarks' own machinery (C{benchmarks/}): the delaying relay
the round trips are counted through, the check that a variant negotiated the
protocol version it is named for, and the tables' ratios and targets.  No
timing is measured or asserted here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from benchmarks import _common, connections, latency, storm


class DelayedTests(SynchronousTestCase):
    """
    L{latency._Delayed}, one direction of the relay.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.delayed = latency._Delayed(self.clock, 1.0)
        self.target = StringTransport()
        self.delayed.attach(self.target)

    def test_delaysEachChunk(self) -> None:
        """
        Each chunk is written the delay after it arrived, not before, in
        order.
        """
        self.delayed.push(b"a")
        self.clock.advance(0.5)
        self.delayed.push(b"b")
        self.clock.advance(0.25)
        self.assertEqual(self.target.value(), b"")
        self.clock.advance(0.25)
        self.assertEqual(self.target.value(), b"a")
        self.clock.advance(0.25)
        self.assertEqual(self.target.value(), b"a")
        self.clock.advance(0.25)
        self.assertEqual(self.target.value(), b"ab")

    def test_closesAfterDelivering(self) -> None:
        """
        Told to close, it closes its target only once everything it holds is
        delivered.
        """
        self.delayed.push(b"a")
        self.clock.advance(0.5)
        self.delayed.push(b"b")
        self.delayed.close()
        self.clock.advance(0.5)
        self.assertEqual(self.target.value(), b"a")
        self.assertFalse(self.target.disconnecting)
        self.clock.advance(0.5)
        self.assertEqual(self.target.value(), b"ab")
        self.assertTrue(self.target.disconnecting)

    def test_holdsUntilAttached(self) -> None:
        """
        Chunks that arrive before the other side is connected wait for it.
        """
        delayed = latency._Delayed(self.clock, 0.025)
        delayed.push(b"early")
        self.clock.advance(1)
        target = StringTransport()
        delayed.attach(target)
        self.clock.advance(0)
        self.assertEqual(target.value(), b"early")


class _Connection:
    def get_group_name(self) -> str:
        return "X25519MLKEM768"

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"


class _TLS:
    _tlsConnection = _Connection()


class _Handshake:
    protocolVersion = 2


class _DwtrustTransport:
    peer = object()
    _tls = _TLS()
    _handshake = _Handshake()


class _OldDwtrustTransport:
    peer = object()
    _tls = _TLS()
    _handshake = object()


class DescribeTests(SynchronousTestCase):
    """
    L{_common.describe} and L{_common.checkProtocol}.
    """

    def test_plainTLS(self) -> None:
        """
        A plain TLS transport has no dwtrust version; its TLS version and
        group are read.
        """
        self.assertEqual(
            _common.describe(_TLS()),
            {"protocol": None, "tls": "TLSv1.3", "group": "X25519MLKEM768"},
        )

    def test_dwtrust(self) -> None:
        """
        A dwtrust transport tells its handshake's protocol version.
        """
        self.assertEqual(_common.describe(_DwtrustTransport())["protocol"], 2)

    def test_unreadable(self) -> None:
        """
        A dwtrust transport whose version cannot be read gives C{"?"}.
        """
        self.assertEqual(_common.describe(_OldDwtrustTransport())["protocol"], "?")

    def _withVersions(self) -> None:
        self.patch(_common, "hasVersions", lambda: True)

    def test_refusesAnotherVersion(self) -> None:
        """
        A variant that negotiated another version than its own ends the
        benchmark with a message naming both.
        """
        self._withVersions()
        seen = [{"protocol": 1, "tls": "TLSv1.3", "group": "X"}]
        with self.assertRaises(SystemExit) as raised:
            _common.checkProtocol("m", "dwtrust-v2", 2, seen)
        self.assertIn("dwtrust-v2 negotiated", str(raised.exception))
        self.assertIn("[1], not 2", str(raised.exception))

    def test_refusesMixedVersions(self) -> None:
        """
        One connection of another version among the right ones is refused
        too.
        """
        self._withVersions()
        seen = [{"protocol": 2, "tls": None, "group": None}] * 2
        seen.append({"protocol": 1, "tls": None, "group": None})
        self.assertRaises(SystemExit, _common.checkProtocol, "m", "v", 2, seen)

    def test_acceptsItsVersion(self) -> None:
        """
        The right version, or one that cannot be read, passes.
        """
        self._withVersions()
        _common.checkProtocol("m", "v", 2, [{"protocol": 2, "tls": "", "group": ""}])
        _common.checkProtocol("m", "v", 2, [{"protocol": "?", "tls": "", "group": ""}])

    def test_requireVersions(self) -> None:
        """
        Asking a dwtrust without versions for some ends with a one-line
        message; asking for none does not.
        """
        self.patch(_common, "hasVersions", lambda: False)
        with self.assertRaises(SystemExit) as raised:
            _common.requireVersions((2, 1), "benchmarks.x")
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn("--versions 1", message)
        _common.requireVersions(None, "benchmarks.x")


def _rate(rate: float, cpu: float) -> dict[str, Any]:
    return {
        "rate": rate,
        "p50ms": 1.0,
        "p99ms": 2.0,
        "failures": 0,
        "serverCpuMs": cpu,
        "clientCpuMs": cpu,
        "rounds": [rate],
    }


def _row(text: str, concurrency: str, name: str) -> str:
    for line in text.splitlines():
        fields = line.split()
        if fields[:2] == [concurrency, name]:
            return line
    raise AssertionError(f"no row {concurrency} {name} in\n{text}")


class ReportTests(SynchronousTestCase):
    """
    The tables' ratios and targets.
    """

    def test_connections(self) -> None:
        """
        Each variant is compared with its own reference; version 2 is held to
        0.9x the rate and 1.15x the server CPU.
        """
        result = {
            "results": {
                "tls-p256": {"1": _rate(100, 1.0), "4": _rate(200, 1.0)},
                "tls-ed25519": {"1": _rate(50, 2.0), "4": _rate(50, 2.0)},
                "dwtrust-v2": {"1": _rate(90, 1.15), "4": _rate(170, 1.0)},
                "dwtrust-v2-ed25519": {"1": _rate(50, 2.4), "4": _rate(50, 2.0)},
            },
            "references": {
                "tls-p256": "tls-p256",
                "tls-ed25519": "tls-ed25519",
                "dwtrust-v2": "tls-p256",
                "dwtrust-v2-ed25519": "tls-ed25519",
            },
        }
        text = connections.report(result)
        one = _row(text, "1", "dwtrust-v2")
        self.assertIn("0.90x", one)
        self.assertIn("rate met, CPU met", one)
        four = _row(text, "4", "dwtrust-v2")
        self.assertIn("0.85x", four)
        self.assertIn("rate MISSED, CPU met", four)
        ed = _row(text, "1", "dwtrust-v2-ed25519")
        self.assertIn("1.00x", ed)
        self.assertIn("1.20x", ed)
        self.assertIn("rate met, CPU MISSED", ed)

    def test_latency(self) -> None:
        """
        Round trips are shown with what they add to plain TLS 1.3; version 2
        meets its target when it adds less than half a round trip to each.
        """

        def figures(trips: float) -> dict[str, dict[str, float]]:
            return {
                m: {
                    "directMs": 1.0,
                    "directP99Ms": 2.0,
                    "relayedMs": trips * 50,
                    "roundTrips": trips,
                }
                for m in latency.MEASURES
            }

        def report(v2: float) -> str:
            return latency.report(
                {
                    "results": {
                        "delayMs": 25,
                        "systems": {"tls": figures(1.5), "dwtrust-v2": figures(v2)},
                    }
                }
            )

        self.assertIn("1.70 (+0.20)", report(1.7))
        self.assertIn("met (worst +0.20)", report(1.7))
        self.assertIn("MISSED (worst +1.00)", report(2.5))

    def test_storm(self) -> None:
        """
        The storm's table has both systems, and dwtrust's figures divided by
        plain TLS's; a reference figure of nothing gives no ratio.
        """

        def phase(lag: float) -> dict[str, Any]:
            return {
                "maxLagMs": lag,
                "p99LagMs": 0.0,
                "rssMiB": 50.0,
                "known": {
                    "successRate": 1.0,
                    "rate": 10.0,
                    "p50Ms": 1.0,
                    "p99Ms": 2.0,
                    "maxMs": 3.0,
                },
            }

        def system(lag: float) -> dict[str, Any]:
            return {"secondsUntilAllHeld": 2.0, "calm": phase(1), "storm": phase(lag)}

        text = storm.report(
            {"results": {"clients": 10, "dwtrust": system(300), "tls": system(100)}}
        )
        self.assertIn("max stall 3.00x", text)
        self.assertIn("p99 stall n/a", text)
        self.assertIn("until all held 1.00x", text)
