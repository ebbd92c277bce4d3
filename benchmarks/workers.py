"""
Connection rate of the daemon, C{twistd dwtrust}, with C{--workers 1} and
C{--workers 2}, measured side by side in one run: per connection, TCP
connect, TLS handshake, authentication (a known P-256 client), a 1-byte echo
through the daemon to a local echo application, and close.

Both daemons run at once (each with its own copy of the identity and the
store), measured in interleaved rounds; the load comes from several client
processes (C{--clients}, each with C{--concurrency} connections at a time)
started together, so that one client process is not the limit.  Besides the
rate it reports the daemon's CPU per connection (the main process and its
workers together) and the clients', since on a machine whose cores the
clients share with the daemon, the clients' CPU bounds what a second worker
can add.

    python -m benchmarks.workers [--quick] [--clients 2] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import react

from . import _common
from ._common import HOST, ROOT

MODULE = "benchmarks.workers"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def children(pid: int) -> list[int]:
    """
    The processes whose parent is C{pid}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def treeCPU(pid: int) -> float:
    """
    The CPU seconds a daemon and its worker processes have used.
    """
    total = 0.0
    for each in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            total += _common.cpuOf(each)
    return total


class Daemon:
    """
    C{twistd -n dwtrust --workers N} on a copy of the benchmark's server
    identity and store, forwarding to C{echo}.
    """

    def __init__(self, work: Path, paths: dict[str, str], workers: int, echo: int):
        self.directory = work / f"workers-{workers}"
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        identity = self.directory / "identity"
        shutil.copytree(paths["server"], identity)
        store = self.directory / "trust.sqlite3"
        shutil.copy(paths["serverStore"], store)
        self.log = self.directory / "twistd.log"
        self.process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--logfile",
                str(self.log),
                "--pidfile",
                str(self.directory / "twistd.pid"),
                "dwtrust",
                "--identity",
                str(identity),
                "--store",
                str(store),
                "--listen",
                f"tcp:0:interface={HOST}",
                "--forward",
                f"tcp:host={HOST}:port={echo}",
                "--workers",
                str(workers),
                "--max-untrusted-per-source",
                "4096",
                "--max-untrusted",
                "4096",
                "--max-tls-handshakes",
                "256",
            ],
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        self.workers = workers
        self.port = self._wait(r"listening for dwtrust peers on \S+ port (\d+)")
        if workers > 1:
            self._wait(rf"worker {workers - 1} \(pid (\d+)\) serving")

    def _wait(self, pattern: str) -> int:
        import re

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.log.read_text()}")
            text = self.log.read_text() if self.log.exists() else ""
            found = re.search(pattern, text)
            if found:
                return int(found.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"the daemon never logged {pattern!r}")

    def cpu(self) -> float:
        return treeCPU(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def echoServer(reactor: Any) -> Deferred[None]:
    """
    The local application: a Twisted echo server, printing its port.
    """
    from twisted.internet.protocol import Factory

    factory = Factory.forProtocol(_common.Echo)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface=HOST)
    print(json.dumps({"port": port.getHost().port}), flush=True)
    return Deferred()


def client(
    reactor: Any,
    pathsJSON: str,
    port: int,
    concurrency: int,
    start: float,
    duration: float,
) -> Deferred[None]:
    """
    One client process: warm up (pin the server), wait for C{start} (a POSIX
    time), measure for C{duration} seconds, print the result as JSON.
    """

    async def run() -> None:
        paths = json.loads(pathsJSON)
        connect, _ = await _common.dwtrustConnector(reactor, paths, port)
        for _ in range(5):
            await connect()
        await _common.sleep(reactor, max(0.0, start - time.time()))
        result = await _common.measureRate(connect, concurrency, duration, reactor)
        print(json.dumps(result), flush=True)

    return Deferred.fromCoroutine(run())


def measure(
    daemon: Daemon,
    paths: dict[str, str],
    work: Path,
    options: argparse.Namespace,
) -> dict[str, Any]:
    """
    One round against C{daemon}: C{options.clients} client processes at once.
    """
    start = time.time() + 4.0
    clientPaths = []
    for number in range(options.clients):
        # Each client process keeps pins of its own.
        own = dict(paths)
        own["clientStore"] = str(work / f"client-{number}.sqlite3")
        clientPaths.append(own)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                MODULE,
                "client",
                json.dumps(own),
                str(daemon.port),
                str(options.concurrency),
                str(start),
                str(options.duration),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for own in clientPaths
    ]
    while time.time() < start:
        time.sleep(0.01)
    before = daemon.cpu()
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=options.duration + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    used = daemon.cpu() - before
    count = sum(r["count"] for r in results)
    elapsed = options.duration
    return {
        "rate": sum(r["rate"] for r in results),
        "count": count,
        "failures": sum(r["failures"] for r in results),
        "serverCpuMs": used / max(1, count) * 1000,
        "serverCores": used / elapsed,
        "clientCpuMs": _common.median([r["clientCpuMs"] for r in results]),
        "p50ms": _common.median([r["p50ms"] for r in results]),
    }


def drive(options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-workers-"))
    paths = _common.setUp(work, "ecdsa-p256")
    echo = subprocess.Popen(
        [sys.executable, "-m", MODULE, "echo"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    daemons: dict[int, Daemon] = {}
    try:
        assert echo.stdout is not None
        echoPort = json.loads(echo.stdout.readline())["port"]
        for count in options.workers:
            daemons[count] = Daemon(work, paths, count, echoPort)
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in daemons}
        for number in range(options.rounds):
            for count, daemon in daemons.items():
                measured = measure(daemon, paths, work, options)
                runs[count].append(measured)
                print(
                    f"  --workers {count} round {number}: {measured['rate']:7.1f}/s"
                    f" (failures {measured['failures']}; daemon cpu/conn"
                    f" {measured['serverCpuMs']:.2f} ms on"
                    f" {measured['serverCores']:.2f} cores, client cpu/conn"
                    f" {measured['clientCpuMs']:.2f} ms)",
                    file=sys.stderr,
                    flush=True,
                )
        summary = {
            str(count): {
                "rate": _common.median([r["rate"] for r in measured]),
                "serverCpuMs": _common.median([r["serverCpuMs"] for r in measured]),
                "serverCores": _common.median([r["serverCores"] for r in measured]),
                "clientCpuMs": _common.median([r["clientCpuMs"] for r in measured]),
                "failures": sum(r["failures"] for r in measured),
                "rounds": [round(r["rate"], 1) for r in measured],
            }
            for count, measured in runs.items()
        }
        base = summary.get("1", {}).get("rate")
        ratios = {
            count: round(result["rate"] / base, 2) if base else None
            for count, result in summary.items()
        }
        _common.emit(
            {
                "benchmark": "workers",
                "cores": len(os.sched_getaffinity(0)),
                "clients": options.clients,
                "concurrency": options.concurrency,
                "results": summary,
                "ratioToOneWorker": ratios,
            }
        )
    finally:
        for daemon in daemons.values():
            daemon.stop()
        echo.terminate()
        echo.wait()


def main(argv: list[str]) -> None:
    if argv[:1] == ["echo"]:
        react(lambda reactor: echoServer(reactor))
    if argv[:1] == ["client"]:
        react(
            lambda reactor: client(
                reactor,
                argv[1],
                int(argv[2]),
                int(argv[3]),
                float(argv[4]),
                float(argv[5]),
            )
        )
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    if options.duration is None:
        options.duration = 3.0 if options.quick else 8.0
    if options.rounds is None:
        options.rounds = 1 if options.quick else 3
    drive(options)


if __name__ == "__main__":
    main(sys.argv[1:])
