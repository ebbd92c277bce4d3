"""
Issue 11's attacks (findings 1 to 7), repeated one after another against a
real C{twistd dwtrust} daemon with an approved client and an owner, for the
figures in C{docs/security.rst}.

Each attack gets a daemon of its own (default options, but for the changes
printed), started on the same identity and on a copy of the same trust store
(in which C{acme/billing} was approved by the owner C{acme/alice}).  While it
runs, the approved client connects again and again from 127.0.0.1 and has one
byte echoed (in a process of its own), and the owner lists the pending
requests after it.  Printed for each: the daemon's VmRSS and VmHWM before the
attack, at its end (the attacker's connections still open) and 5 s after the
attacker let go; the known client's success rate and p50/max latency during
the attack; the largest reactor stall (measured in the daemon as
L{benchmarks._common.LagMonitor} measures it for C{benchmarks.storm}: a call
every 10 ms, how late it ran); what the attacker got; and the limit that
answered.

The attackers are the tests' (C{tests.test_limits}'s L{Peer} and
certificates, C{tests.attackers}' C{flood}, C{fields} and C{hold}, the
webhook of C{tests.test_control_limits}); all traffic goes to and from
127.0.0.0/8, and every attack is bounded in count and time.

    python -m benchmarks.attacks [--quick] [--json FILE] [--directory DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import _common
from ._common import ROOT, percentile, rssOf

MIB = 2**20


# --- In the daemon: the stall log ----------------------------------------------


class _StallLog(_common.LagMonitor):
    """
    L{LagMonitor}, keeping nothing in memory: every stall over 2 ms is
    appended to a file, with the wall-clock time it ended.
    """

    def __init__(self, clock: Any, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115
        super().__init__(clock)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._last - self.interval)
        self._last = now
        if lag > 0.002:
            self._file.write(f"{time.time():.3f} {lag:.4f}\n")


def twistdMain(argv: list[str]) -> None:
    """
    C{twistd ARGV...}, with a L{_StallLog} in its reactor (the file named by
    C{DWTRUST_STALL_LOG}).
    """
    from twisted.internet import reactor
    from twisted.scripts.twistd import run

    path = os.environ["DWTRUST_STALL_LOG"]
    reactor.callWhenRunning(_StallLog, reactor, path)  # type: ignore[attr-defined]
    sys.argv = ["twistd", *argv]
    run()


# --- The known client's loop, in a process of its own ---------------------------


def knownMain(identityDir: str, port: str, pins: str, out: str) -> None:
    """
    Connect, have one byte echoed, close; again and again, 50 ms apart; one
    JSON line per attempt in C{out}: when it started, how long it took,
    and whether the byte came back (or how it failed).
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.task import deferLater, react
    from twisted.python.filepath import FilePath

    from dwtrust import Identity, openAuthenticator

    class Echoed(Protocol):
        def __init__(self, done: Deferred[str]) -> None:
            self.done = done
            self.got = False

        def connectionMade(self) -> None:
            self.transport.write(b"x")  # type: ignore[union-attr]

        def dataReceived(self, data: bytes) -> None:
            self.got = True
            self.transport.loseConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            if self.done.called:
                return
            if self.got:
                self.done.callback("ok")
            else:
                code = getattr(getattr(reason, "value", None), "code", None)
                self.done.callback(f"lost:{getattr(code, 'value', code)}")

    async def main(reactor: Any) -> None:
        identity = Identity.load(FilePath(identityDir))
        authenticator = await openAuthenticator(
            reactor, identity, FilePath(pins), approver="known-only"
        )
        endpoint = authenticator.clientEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", int(port)),
            f"127.0.0.1:{port}",
        )
        with open(out, "a", buffering=1) as log:
            while True:
                began, started = time.time(), time.monotonic()
                done: Deferred[str] = Deferred()
                factory = Factory.forProtocol(lambda: Echoed(done))  # noqa: B023
                factory.noisy = False
                endpoint.connect(factory).addErrback(done.errback)
                done.addTimeout(30, reactor)
                try:
                    outcome = await done
                except Exception as e:
                    code = getattr(e, "code", None)
                    outcome = f"{type(e).__name__}:{getattr(code, 'value', code)}"
                log.write(
                    json.dumps(
                        {
                            "t": began,
                            "seconds": time.monotonic() - started,
                            "outcome": outcome,
                        }
                    )
                    + "\n"
                )
                await deferLater(reactor, 0.05, lambda: None)

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))


# --- The driver ------------------------------------------------------------------


def say(*args: Any) -> None:
    print(*args, flush=True)


class Run:
    """
    The identities, the echo server, the webhook and what is shared by the
    attacks.
    """

    def __init__(self, work: Path, quick: bool) -> None:
        from tests.processes import EchoServer, keygen
        from tests.test_e2e_owners import Made, Site

        self.work = work
        self.quick = quick
        identities = work / "identities"
        made = {}
        for name, service in (("ledger", "ledger"), ("billing", "billing")):
            made[name] = Made(
                identities / name, keygen(identities / name, "acme", service)
            )
        made["alice"] = Made(
            identities / "alice", keygen(identities / "alice", "acme", "alice")
        )
        self.site = Site(work / "site", made)
        self.echo = EchoServer(work / "echo").__enter__()
        self.baseline = work / "baseline"
        self.count = 0

    # The daemon

    def daemon(self, *options: str) -> Any:
        """
        A daemon of acme/ledger (its owner alice, its audit log in the
        site's), on a copy of the baseline store, with the stall log.
        """
        from tests.processes import Daemon

        self.count += 1
        stalls = self.work / f"stalls-{self.count}.log"
        stalls.touch()
        if self.baseline.exists():
            for path in self.site.store.parent.glob("trust.sqlite3*"):
                path.unlink()
            for path in self.baseline.iterdir():
                shutil.copy(path, self.site.store.parent / path.name)
        if self.site.audit.exists():
            self.site.audit.unlink()

        class StallDaemon(Daemon):
            def command(self) -> list[str]:
                wrapper = [sys.executable, "-m", "benchmarks.attacks", "twistd"]
                return [*wrapper, *super().command()[1:]]

        daemon = StallDaemon(
            self.work / f"daemon-{self.count}",
            "--identity",
            str(self.site.path("ledger")),
            "--forward",
            self.echo.forward,
            "--audit-log",
            str(self.site.audit),
            "--owner",
            str(self.site.path("alice") / "id_dwtrust.pub"),
            *options,
            env={"PYTHONPATH": str(ROOT), "DWTRUST_STALL_LOG": str(stalls)},
        )
        daemon.stalls = stalls
        return daemon

    def approveBilling(self) -> None:
        """
        Once: billing connects, alice approves its request; the store is
        kept as the baseline.
        """
        from tests.test_e2e_owners import approveLater

        with self.daemon("--decision-timeout", "10") as daemon:
            approveLater(self.site, daemon, "billing")
        self.baseline.mkdir()
        for path in self.site.store.parent.glob("trust.sqlite3*"):
            shutil.copy(path, self.baseline / path.name)

    # What is measured

    def memory(self, daemon: Any) -> dict[str, float]:
        pid = daemon._process.pid
        return {
            "rssMiB": rssOf(pid) / MIB,
            "hwmMiB": rssOf(pid, "VmHWM") / MIB,
        }

    def ownerServed(self) -> dict[str, Any]:
        started = time.monotonic()
        done = self.site.owner("pending", "--json")
        seconds = time.monotonic() - started
        pending = None
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip().splitlines()
            return {"ok": False, "seconds": seconds, "error": error[-1:]}
        if done.returncode == 0:
            with contextlib.suppress(ValueError, KeyError):
                listing = json.loads(done.stdout)
                pending = len(listing["pending"]) + listing.get("omitted", 0)
        return {"ok": done.returncode == 0, "seconds": seconds, "pending": pending}

    @contextlib.contextmanager
    def knownClient(self, daemon: Any) -> Iterator[Callable[[float, float], Any]]:
        """
        The approved client's loop, while the block runs; yields a function
        of a time window that summarises the attempts in it.
        """
        out = self.work / f"known-{self.count}.jsonl"
        out.touch()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.attacks",
                "known",
                str(self.site.path("billing")),
                str(daemon.port),
                str(self.work / "pins.sqlite3"),
                str(out),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )

        def attempts() -> list[dict[str, Any]]:
            found = []
            for line in out.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
            return found

        def window(start: float, end: float) -> dict[str, Any]:
            inside = [a for a in attempts() if start <= a["t"] <= end]
            ok = [a["seconds"] for a in inside if a["outcome"] == "ok"]
            failed = Counter(a["outcome"] for a in inside if a["outcome"] != "ok")
            return {
                "attempts": len(inside),
                "ok": len(ok),
                "successRate": len(ok) / len(inside) if inside else float("nan"),
                "p50Ms": percentile(ok, 50) * 1000,
                "maxMs": max(ok, default=float("nan")) * 1000,
                "failures": dict(failed),
            }

        try:
            deadline = time.monotonic() + 60
            while not any(a["outcome"] == "ok" for a in attempts()):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the known client never got through: {out}")
                time.sleep(0.1)
            yield window
            # Attempts under way at the end are counted too.
            time.sleep(0.5)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stalls(self, daemon: Any, start: float, end: float) -> float:
        lags = [0.0]
        for line in daemon.stalls.read_text().splitlines():
            when, lag = line.split()
            if start <= float(when) <= end + 0.5:
                lags.append(float(lag))
        return max(lags) * 1000

    def logSince(self, daemon: Any, offset: int) -> str:
        text: str = daemon.log()
        return text[offset:]

    def measure(
        self,
        name: str,
        options: list[str],
        changes: list[str],
        attack: Callable[[Any], dict[str, Any]],
        limit: str,
        patterns: dict[str, str],
    ) -> dict[str, Any]:
        """
        Start a daemon with C{options}, run C{attack} against it (a function
        of the daemon that returns what the attacker got, and may return a
        C{release} callable to let go of what it holds), and measure.
        """
        say(f"\n== {name}")
        for change in changes:
            say(f"   option changed: {change}")
        result: dict[str, Any] = {"attack": name, "changes": changes, "limit": limit}
        try:
            with self.daemon(*options) as daemon, self.knownClient(daemon) as known:
                result["ownerBefore"] = self.ownerServed()
                offset = len(daemon.log())
                time.sleep(1.0)
                before = self.memory(daemon)
                start = time.time()
                got = attack(daemon)
                end = time.time()
                after = self.memory(daemon)
                release = got.pop("release", None)
                if release is not None:
                    release()
                time.sleep(5)
                later = self.memory(daemon)
                result["ownerAfter"] = self.ownerServed()
                log = self.logSince(daemon, offset)
                result.update(
                    seconds=end - start,
                    memory={"before": before, "after": after, "after5s": later},
                    known=known(start, end),
                    maxStallMs=self.stalls(daemon, start, end),
                    got=got,
                    logged={k: len(re.findall(p, log)) for k, p in patterns.items()},
                    tracebacks=log.count("Traceback"),
                )
        except Exception as e:
            import traceback

            traceback.print_exc()
            result["error"] = repr(e)
        say(f"   {json.dumps(result, default=str)}")
        return result


def runAttacker(mode: str, limit: float, **arguments: Any) -> dict[str, Any]:
    """
    One of C{tests.attackers}' attacks, run to its end.
    """
    done = subprocess.run(
        [sys.executable, "-m", "tests.attackers", mode, json.dumps(arguments)],
        capture_output=True,
        timeout=limit,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"attacker {mode} exited {done.returncode}: {done.stderr!r}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


# --- The attacks -------------------------------------------------------------------


def frameCode(frame: Any) -> str:
    from dwtrust._wire import Challenge, Error

    if isinstance(frame, Error):
        return str(frame.code)
    if isinstance(frame, Challenge):
        return "challenge"
    return "closed" if frame is None else type(frame).__name__


def bigCertificates(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 1: handshakes, each with a certificate of its own of ~90 KiB (a
    valid key in a large extension), from 127.0.1.1, four at a time; then
    one two-certificate chain.
    """
    from dwtrust import Identity
    from tests.test_limits import Peer, bigContext, chainContext

    wanted = 1000 if run.quick else 4096
    budget = 25.0 if run.quick else 90.0
    identities = [Identity.generate("evil", f"e{i}") for i in range(16)]
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    counter = iter(range(wanted))
    deadline = time.monotonic() + budget
    messages: set[str] = set()

    def worker() -> None:
        for n in counter:
            if time.monotonic() > deadline:
                return
            try:
                peer = Peer(daemon.port, bigContext(identities[n % 16]), "127.0.1.1")
                try:
                    peer.handshake()
                    frame = peer.frame(timeout=10)
                    code = frameCode(frame)
                    explanation = getattr(frame, "explanation", None)
                finally:
                    peer.close()
            except Exception as e:
                code, explanation = type(e).__name__, None
            with lock:
                codes[code] += 1
                if explanation and len(messages) < 3:
                    messages.add(explanation)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(worker)
    done = sum(codes.values())
    if done < wanted:
        say(f"   {done} of {wanted} handshakes in the {budget:.0f} s allowed")
    peer = Peer(daemon.port, chainContext(identities[0]), "127.0.1.1")
    try:
        peer.handshake()
        chain = peer.frame(timeout=10)
        chainCode = frameCode(chain)
        messages.add(getattr(chain, "explanation", ""))
    finally:
        peer.close()
    return {
        "handshakes": done,
        "asked": wanted,
        "codes": dict(codes),
        "chain": chainCode,
        "messages": sorted(messages),
    }


def heldConnections(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 2: one unknown key opens connections from 127.0.2.1, proves
    itself and sends 300 KiB on each, holding them; then 127.0.3.1 opens
    plain TCP connections and holds them.
    """
    from OpenSSL import SSL

    from dwtrust import Identity
    from dwtrust._tls import makeContext
    from tests.test_limits import Peer

    keyConnections = 150 if run.quick else 500
    addressConnections = 300 if run.quick else 1000
    stranger = Identity.generate("evil", "holder")
    context = makeContext(stranger)
    held: list[Any] = []
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + (40 if run.quick else 90)

    def one(_: int) -> None:
        if time.monotonic() > deadline:
            return
        try:
            peer = Peer(daemon.port, context, "127.0.2.1")
        except OSError as e:
            with lock:
                codes[f"connect:{type(e).__name__}"] += 1
            return
        with lock:
            held.append(peer)
        try:
            peer.handshake()
        except Exception:
            # Closed as soon as it was accepted.
            with lock:
                codes["closed at accept"] += 1
            return
        try:
            peer.prove(stranger)
            with contextlib.suppress(OSError, SSL.Error, TimeoutError):
                peer.sendBytes(bytes(300 * 1024), timeout=2)
            frame = peer.frame(timeout=1)
            code = "held" if frame is None and not _closed(peer.sock) else None
            code = code or frameCode(frame)
        except Exception as e:
            code = type(e).__name__
        with lock:
            codes[code] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(keyConnections)))
    # One address, plain TCP.
    sockets = []
    failedToConnect = 0
    for _ in range(addressConnections):
        sock = socket.socket()
        try:
            sock.bind(("127.0.3.1", 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", daemon.port))
        except OSError:
            failedToConnect += 1
            sock.close()
            continue
        sockets.append(sock)
    time.sleep(1.0)
    closedAtOnce = sum(1 for sock in sockets if _closed(sock))

    def release() -> None:
        for peer in held:
            peer.close()
        for sock in sockets:
            sock.close()

    return {
        "oneKey": {"connections": keyConnections, "codes": dict(codes)},
        "oneAddress": {
            "connections": addressConnections,
            "closedAtOnce": closedAtOnce,
            "stillOpen": len(sockets) - closedAtOnce,
            "connectFailed": failedToConnect,
        },
        "release": release,
    }


def _closed(sock: socket.socket) -> bool:
    """
    Whether the daemon has closed this connection (without waiting).
    """
    # Not select(): the attacker's descriptors may be past FD_SETSIZE.  And
    # no time-out on the socket, or recv() would wait for it first.
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def controlChannel(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 3: a key that is not an owner's sends one 64 MB control message
    of 64,000 fields; then keys that are not owners' hold control
    connections, silent.
    """
    many = runAttacker(
        "fields",
        120,
        control=run.site.control,
        fields=64_000,
        size=1000,
        seconds=60,
    )
    if run.quick:
        keys, connections, seconds = 4, 20, 15
    else:
        keys, connections, seconds = 20, 70, 55
    held = runAttacker(
        "hold",
        seconds + 120,
        control=run.site.control,
        keys=keys,
        connections=connections,
        seconds=seconds,
    )
    closed = [c["closedAfter"] for c in held["connections"]]
    return {
        "message": {
            "sentBytes": many["sent"],
            "messageBytes": many["total"],
            "closedByDaemon": many["closedByDaemon"],
            "closedAfterS": many["closedAfter"],
        },
        "idle": {
            "connections": connections,
            "keys": keys,
            "heldFor": seconds,
            # Seconds from the first connection.
            "closedByDaemon": sum(1 for c in closed if c is not None and c < seconds),
            "lastClosedAfterS": max((c for c in closed if c is not None), default=None),
            "neverClosed": sum(1 for c in closed if c is None or c >= seconds),
        },
    }


def pendingLockout(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 4: fresh keys from 100 addresses (127.0.0.2 to .101), then one
    legitimate new key from 127.5.0.1.
    """
    keys = 300 if run.quick else 1000
    sources = [f"127.0.0.{n}" for n in range(2, 102)]
    flood = runAttacker(
        "flood",
        300,
        address=daemon.address,
        sources=sources,
        keys=keys,
        concurrency=50,
        wait=2.0,
        timeout=60.0,
    )
    legitimate = runAttacker(
        "flood",
        120,
        address=daemon.address,
        sources=["127.5.0.1"],
        keys=1,
        concurrency=1,
        wait=2.0,
    )
    pending = run.site.owner("pending", "--json")
    listed = json.loads(pending.stdout)["pending"] if pending.returncode == 0 else []
    return {
        "flood": {"keys": keys, "outcomes": flood["outcomes"]},
        # "connected": held, waiting for the owners (its request is in).
        "legitimate": legitimate["outcomes"],
        "legitimatePending": any(p["source"].startswith("127.5.0.1:") for p in listed),
        "pendingRequests": len(listed),
    }


def webhookApprover(run: Run, daemon: Any, hook: Any) -> dict[str, Any]:
    """
    Finding 5: fresh keys from one address (127.0.0.7), the daemon asking a
    webhook (that takes 0.2 s to answer, and denies them) before its owners.
    """
    from tests.test_control_limits import storedRows

    keys = 200 if run.quick else 500
    store = run.site.store

    def size() -> int:
        return sum(p.stat().st_size for p in store.parent.glob("trust.sqlite3*"))

    callsBefore, sizeBefore, rowsBefore = hook.calls, size(), storedRows(store)
    hook.most = 0
    flood = runAttacker(
        "flood",
        300,
        address=daemon.address,
        sources=["127.0.0.7"],
        keys=keys,
        concurrency=50,
        wait=2.0,
        timeout=60.0,
    )
    return {
        "keys": keys,
        "outcomes": flood["outcomes"],
        "webhookCalls": hook.calls - callsBefore,
        "webhookMostAtOnce": hook.most,
        "storeBytes": [sizeBefore, size()],
        "storeRows": [list(rowsBefore), list(storedRows(store))],
    }


def scans(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 6: 50 connections from 127.0.6.1 that complete TLS, send HELLO,
    read the CHALLENGE and leave.
    """
    from dwtrust import Identity
    from dwtrust._tls import makeContext
    from dwtrust._wire import CHALLENGE_SIZE, Hello
    from tests.test_limits import Peer

    scanner = Identity.generate("evil", "scanner")
    context = makeContext(scanner)
    codes: Counter[str] = Counter()
    for _ in range(50):
        peer = Peer(daemon.port, context, "127.0.6.1")
        try:
            peer.handshake()
            peer.send(Hello(bytes(CHALLENGE_SIZE)))
            codes[frameCode(peer.frame(timeout=10))] += 1
        finally:
            peer.close()
    time.sleep(1.0)
    lines = re.findall(r"127\.0\.6\.1:\d+ left during", daemon.log())
    events = []
    if run.site.audit.exists():
        for line in run.site.audit.read_text().splitlines():
            if '"dwtrust.abandoned"' in line:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return {
        "scans": 50,
        "read": dict(codes),
        "logLines": len(lines),
        "auditEvents": len(events),
        "suppressedCounted": sum(e.get("suppressed", 0) for e in events),
    }


def storm(run: Run, daemon: Any) -> dict[str, Any]:
    """
    Finding 7: fresh keys, all at once, from 1,000 addresses in 100 /24s
    (127.7.0.1 to 127.7.99.10).
    """
    clients = 500 if run.quick else 1000
    sources = [f"127.7.{n // 10}.{n % 10 + 1}" for n in range(clients)]
    flood = runAttacker(
        "flood",
        300,
        address=daemon.address,
        sources=sources,
        keys=clients,
        concurrency=clients,
        wait=5.0,
        timeout=60.0,
    )
    return {"clients": clients, "outcomes": flood["outcomes"]}


# --- The table ------------------------------------------------------------------


def short(got: dict[str, Any]) -> str:
    text = json.dumps(got, separators=(",", ":"))
    return text.replace('"', "")


def fmt(value: Any, spec: str = ".0f") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def table(results: list[dict[str, Any]]) -> str:
    headers = [
        "attack",
        "RSS MiB before/after/+5s",
        "HWM MiB before/after",
        "known ok",
        "known p50/max ms",
        "owner",
        "max stall ms",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["attack"], "ERROR " + r["error"][:60], "", "", "", "", ""])
            continue
        m, k = r["memory"], r["known"]
        rows.append(
            [
                r["attack"],
                f"{m['before']['rssMiB']:.0f} / {m['after']['rssMiB']:.0f}"
                f" / {m['after5s']['rssMiB']:.0f}",
                f"{m['before']['hwmMiB']:.0f} / {m['after']['hwmMiB']:.0f}",
                f"{k['ok']}/{k['attempts']} ({100 * k['successRate']:.0f}%)",
                f"{fmt(k['p50Ms'])} / {fmt(k['maxMs'])}",
                "ok" if r["ownerBefore"]["ok"] and r["ownerAfter"]["ok"] else "FAILED",
                f"{r['maxStallMs']:.0f}",
            ]
        )
    widths = [
        max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)
    ]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append(rule)
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    lines.append(rule)
    lines.append("")
    for r in results:
        if "error" in r:
            continue
        lines.append(f"{r['attack']}:")
        lines.append(f"  attacker got: {short(r['got'])}")
        lines.append(f"  limit: {r['limit']}")
        lines.append(f"  daemon log: {short(r['logged'])}")
        if r["known"]["failures"]:
            lines.append(f"  known client failures: {short(r['known']['failures'])}")
        if r["changes"]:
            lines.append(f"  options changed: {'; '.join(r['changes'])}")
    return "\n".join(lines)


# --- Main -----------------------------------------------------------------------


REFUSED = r"(?i)refused"


def main(argv: list[str]) -> None:
    if argv[:1] == ["twistd"]:
        twistdMain(argv[1:])
        return
    if argv[:1] == ["known"]:
        knownMain(*argv[1:5])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks")
    parser.add_argument("--quick", action="store_true", help="smaller numbers (~3 min)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--directory", default=None, help="work files (kept)")
    options = parser.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    # Every process of the run (daemons, commands, attackers) imports dwtrust
    # from this tree.
    os.environ["PYTHONPATH"] = str(ROOT)
    _common.raiseFileLimit()
    began = time.monotonic()
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-attacks-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = _common.machineInfo()
    say(json.dumps(machine))
    say(f"work files: {work}")
    run = Run(work, options.quick)
    results: list[dict[str, Any]] = []
    try:
        run.approveBilling()
        results.append(
            run.measure(
                "1 big certificates",
                [],
                [],
                lambda d: bigCertificates(run, d),
                "--max-certificate (8192): refused with protocol_error;"
                " one certificate only",
                {"refused": REFUSED, "limited": r"dwtrust: refused a connection"},
            )
        )
        results.append(
            run.measure(
                "2 held connections",
                [],
                [],
                lambda d: heldConnections(run, d),
                "--max-waiting-per-new-key (4): unavailable; --max-held-bytes"
                " (16 MiB); --max-untrusted-per-source (64): closed at accept",
                {
                    "refusedConnection": r"dwtrust: refused a connection",
                    "waiting": r"already wait for a decision",
                },
            )
        )
        idle = ["--control-idle-timeout", "5"] if options.quick else []
        results.append(
            run.measure(
                "3 control channel",
                idle,
                ["--control-idle-timeout 5 (30): a shorter run"]
                if options.quick
                else [],
                lambda d: controlChannel(run, d),
                "--control-max-fields (16) / --control-max-message (128 KiB);"
                " --control-idle-timeout; --control-max-per-key (4),"
                " --control-max-connections (64)",
                {
                    "fields": r"REFUSED a control connection .*fields",
                    "idle": r"REFUSED a control connection .* silent",
                    "perKey": r"already has \d+ control connections",
                    "total": r"control connections of keys that are not owners",
                },
            )
        )
        results.append(
            run.measure(
                "4 pending lockout",
                [],
                [],
                lambda d: pendingLockout(run, d),
                "--max-pending-per-source (10 per /24): unavailable;"
                " --pending-reserve for known prefixes",
                {"refused": REFUSED},
            )
        )
        from tests.test_control_limits import _HookServer

        hook = _HookServer()
        hook.delay = 0.2
        thread = threading.Thread(target=hook.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{hook.server_address[1]}/approve"
        try:
            results.append(
                run.measure(
                    "5 webhook approver",
                    ["--approver", f"webhook:{url}", "--approver", "owners"],
                    [
                        "--approver webhook:URL --approver owners (owners):"
                        " the attack's setting; the local webhook takes 0.2 s"
                        " and denies"
                    ],
                    lambda d: webhookApprover(run, d, hook),
                    "--max-pending-per-source (10 per /24) before the webhook;"
                    " --max-approver-calls (16); its denials kept in memory",
                    {"refused": REFUSED},
                )
            )
        finally:
            hook.shutdown()
            hook.server_close()
        results.append(
            run.measure(
                "6 scans",
                [],
                ["--audit-log (none), on for every attack: to count events"],
                lambda d: scans(run, d),
                "abandoned handshakes logged, one line per prefix per"
                " --scan-log-interval (60 s), the rest counted",
                {"abandoned": r"left during"},
            )
        )
        results.append(
            run.measure(
                "7 storm",
                [],
                [],
                lambda d: storm(run, d),
                "--max-tls-handshakes (16): admission before TLS;"
                " --max-untrusted (512); --max-pending-per-source (10 per /24)",
                {
                    "refusedConnection": r"dwtrust: refused a connection",
                    "refused": REFUSED,
                },
            )
        )
    finally:
        with contextlib.suppress(Exception):
            run.echo.__exit__(None, None, None)
    command = "python -m benchmarks.attacks" + (" --quick" if options.quick else "")
    text = (
        f"Command: {command} ({time.monotonic() - began:.0f} s,"
        f" {machine['date']}, {machine['cores']} cores)\n\n" + table(results)
    )
    say("\n" + text)
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {"command": command, "machine": machine, "results": results},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
