"""
The trust store at scale: 1,000,000 known keys (100,000 with C{--quick}) in
SQLite and in PostgreSQL, against an empty store.

- Lookups during handshakes: the server's store is wrapped so that each
  C{lookup} the handshake makes is timed, from the call to its result (the
  thread hop included); real clients, whose keys are in the store with signed
  approvals, connect 4 at a time.
- Lookups of random keys: 2,000 lookups, one after another, of keys picked at
  random among the bulk ones, through the store's own API (no cache can help).
- Start-up: C{twistd -n dwtrust} over the store, from spawn until its port
  accepts a TCP connection, median of 3.

The bulk keys are rows written straight into the store's table (random
fingerprints and blobs, no signed decisions): they are there to be looked up
past, not to connect with.

    python -m benchmarks.store [--quick] [--keys N] [--no-postgres]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import react

from . import _common
from ._common import HOST, Echo, ServerProcess

MODULE = "benchmarks.store"
COLUMNS = (
    "fingerprint, org, service, algorithm, public_key, state, first_seen,"
    " last_seen, source, decided_by, decision"
)


# --- The server ------------------------------------------------------------------


class TimedStore:
    """
    A store whose C{lookup}s are timed; everything else passes through.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.times: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def lookup(self, fingerprint: str) -> Deferred[Any]:
        started = time.perf_counter()

        def done(result: Any) -> Any:
            self.times.append(time.perf_counter() - started)
            return result

        result: Deferred[Any] = self._store.lookup(fingerprint).addBoth(done)
        return result


def server(reactor: Any, description: str, pathsJSON: str) -> Deferred[None]:
    paths = json.loads(pathsJSON)
    finished: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("after", "shutdown", finished.callback, None)
    timed: list[TimedStore] = []

    def wrap(store: Any) -> TimedStore:
        timed.append(TimedStore(store))
        return timed[0]

    def stats() -> dict[str, Any]:
        times = timed[0].times if timed else []
        result = {
            "lookups": len(times),
            "lookupP50Ms": _common.percentile(times, 50) * 1000,
            "lookupP99Ms": _common.percentile(times, 99) * 1000,
        }
        if timed:
            timed[0].times = []
        return result

    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    _common.listenDwtrust(
        reactor, paths["server"], description, factory, wrapStore=wrap
    ).addCallback(
        lambda listened: _common.serveCommands(
            reactor, {"port": listened[0].getHost().port}, stats
        )
    )
    return finished


# --- Filling stores ----------------------------------------------------------------


def bulkRows(count: int, seed: int = 1) -> Iterator[tuple[Any, ...]]:
    generator = random.Random(seed)
    now = time.time()
    for i in range(count):
        digest = generator.randbytes(32)
        fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
        yield (
            fingerprint,
            "bulk",
            f"svc{i}",
            "ssh-ed25519",
            generator.randbytes(51),
            "approved",
            now,
            now,
            "bulk",
            "",
            b"",
        )


def sampleFingerprints(count: int, sample: int) -> list[str]:
    chosen = set(random.Random(2).sample(range(count), min(sample, count)))
    return [row[0] for i, row in enumerate(bulkRows(count)) if i in chosen]


def approvedRows(paths: dict[str, str]) -> list[tuple[Any, ...]]:
    """
    The real client's row (its decision is in L{approvedDecisions}).
    """
    return [approved(paths)[0]]


def approvedDecisions(paths: dict[str, str]) -> list[tuple[Any, ...]]:
    """
    The real client's decision, signed by the server, first in its history.
    """
    return [approved(paths)[1]]


def approved(paths: dict[str, str]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    from twisted.python.filepath import FilePath

    from dwtrust import Identity, PeerIdentity
    from dwtrust._decision import SignedDecision
    from dwtrust.store import KeyState
    from dwtrust.store._rows import decisionRow

    server = Identity.load(FilePath(paths["server"]))
    client = Identity.load(FilePath(paths["client"]))
    peer = PeerIdentity(client.org, client.service, client.publicKey)
    now = time.time()
    decision = SignedDecision.make(
        server,
        server.name,
        peer,
        "approved",
        now,
        "bench",
        server.fingerprint,
        1,
    )
    row = (
        peer.fingerprint,
        peer.org,
        peer.service,
        peer.algorithm,
        peer.publicKey.blob,
        "approved",
        now,
        now,
        "benchmark",
        server.fingerprint,
        b"",
    )
    return row, decisionRow(
        peer,
        1,
        KeyState.approved,
        server.fingerprint,
        "",
        now,
        decision.encode(),
    )


def sqliteStore(work: Path, count: int, paths: dict[str, str]) -> str:
    """
    A SQLite store with C{count} bulk keys and the real client; the bulk file
    is made once and copied.
    """
    from dwtrust.store._rows import DECISION_COLUMNS
    from dwtrust.store._sqlite import migrateFile

    template = work / f"bulk-{count}.sqlite3"
    if not template.exists():
        started = time.monotonic()
        partial = work / f"bulk-{count}.partial"
        for suffix in ("", "-wal", "-shm"):
            Path(str(partial) + suffix).unlink(missing_ok=True)
        migrateFile(str(partial))
        connection = sqlite3.connect(partial)
        connection.execute("PRAGMA journal_mode=DELETE")
        with connection:
            connection.executemany(
                f"INSERT INTO peers ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                bulkRows(count),
            )
        connection.close()
        partial.rename(template)
        print(
            f"  filled SQLite with {count} keys in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
    target = work / f"store-{count}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    shutil.copyfile(template, target)
    connection = sqlite3.connect(target)
    with connection:
        connection.executemany(
            f"INSERT OR REPLACE INTO peers ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            approvedRows(paths),
        )
        connection.executemany(
            f"INSERT OR REPLACE INTO decisions ({DECISION_COLUMNS})"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            approvedDecisions(paths),
        )
    connection.close()
    return str(target)


def postgresStore(url: str, count: int, paths: dict[str, str]) -> str:
    import psycopg

    from dwtrust.store._postgres import migrateURL
    from dwtrust.store._rows import DECISION_COLUMNS

    started = time.monotonic()
    migrateURL(url)
    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        with cursor.copy(f"COPY peers ({COLUMNS}) FROM STDIN") as copy:
            for row in bulkRows(count):
                copy.write_row(row)
            for row in approvedRows(paths):
                copy.write_row(row)
        with cursor.copy(f"COPY decisions ({DECISION_COLUMNS}) FROM STDIN") as copy:
            for row in approvedDecisions(paths):
                copy.write_row(row)
        cursor.execute("ANALYZE peers")
    print(
        f"  filled PostgreSQL with {count} keys in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return url


# --- Measuring ------------------------------------------------------------------------


async def randomLookups(description: str, fingerprints: list[str]) -> dict[str, float]:
    from dwtrust.store import openStore

    store = await openStore(description)
    times = []
    try:
        for fingerprint in fingerprints:
            started = time.perf_counter()
            record = await store.lookup(fingerprint)
            times.append(time.perf_counter() - started)
            assert record is not None, fingerprint
    finally:
        await store.close()
    return {
        "p50Ms": _common.percentile(times, 50) * 1000,
        "p99Ms": _common.percentile(times, 99) * 1000,
    }


def freePort() -> int:
    probe = socket.socket()
    probe.bind((HOST, 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def startupSeconds(work: Path, description: str, paths: dict[str, str]) -> float:
    """
    Spawn C{twistd -n dwtrust} over the store; time until its port accepts.
    """
    port = freePort()
    control = work / f"control-{os.getpid()}-{port}.sock"
    log = work / "twistd.log"
    twistd = str(Path(sys.executable).with_name("twistd"))
    started = time.monotonic()
    process = subprocess.Popen(
        [
            twistd,
            "-n",
            "--pidfile=",
            f"--logfile={log}",
            "dwtrust",
            "--identity",
            paths["server"],
            "--store",
            description,
            "--listen",
            f"tcp:{port}:interface={HOST}",
            "--forward",
            f"tcp:host={HOST}:port=9",
            "--control",
            f"unix:{control}",
        ],
        cwd=_common.ROOT,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"twistd exited; see {log}")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return time.monotonic() - started
            except OSError:
                time.sleep(0.005)
            if time.monotonic() - started > 60:
                raise RuntimeError("twistd did not listen within 60 s")
    finally:
        process.terminate()
        process.wait(10)
        control.unlink(missing_ok=True)


async def measure(
    reactor: Any,
    work: Path,
    kind: str,
    description: str,
    count: int,
    paths: dict[str, str],
    options: argparse.Namespace,
) -> dict[str, Any]:
    process = ServerProcess(MODULE, description, json.dumps(paths))
    try:
        connect, auth = await _common.dwtrustConnector(reactor, paths, process.port)
        for _ in range(20):
            await connect()
        process.command("stats")  # drop the warm-up's lookups
        rate = await _common.measureRate(
            connect, 4, options.duration, reactor, process.pid
        )
        stats = process.command("stats")
        await auth.close()
    finally:
        process.stop()
    result: dict[str, Any] = {
        "keys": count,
        "rate": rate["rate"],
        "handshakeLookups": stats["lookups"],
        "handshakeLookupP50Ms": stats["lookupP50Ms"],
        "handshakeLookupP99Ms": stats["lookupP99Ms"],
    }
    if count:
        result["random"] = await randomLookups(
            description, sampleFingerprints(count, options.sample)
        )
    result["startupSeconds"] = _common.median(
        [startupSeconds(work, description, paths) for _ in range(3)]
    )
    print(f"  {kind} {count}: {result}", file=sys.stderr, flush=True)
    return result


async def drive(reactor: Any, options: argparse.Namespace) -> None:
    work = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    paths = _common.setUp(work, "ecdsa-p256")
    results: dict[str, Any] = {"keys": options.keys}
    results["sqlite"] = [
        await measure(
            reactor, work, "sqlite", sqliteStore(work, n, paths), n, paths, options
        )
        for n in (0, options.keys)
    ]
    if options.postgres:
        sys.path.insert(0, str(_common.ROOT))
        from tests.postgres import PostgreSQLServer

        postgres = PostgreSQLServer()
        try:
            postgres.create()
            postgres.start()
            results["postgresql"] = []
            for n in (0, options.keys):
                url = postgresStore(postgres.newDatabase(), n, paths)
                results["postgresql"].append(
                    await measure(reactor, work, "postgresql", url, n, paths, options)
                )
        except Exception as e:
            results["postgresqlError"] = repr(e)
            print(f"  PostgreSQL failed: {e!r}", file=sys.stderr)
        finally:
            try:
                postgres.stop()
            finally:
                postgres.destroy()
    _common.emit({"benchmark": "store", "results": results})


def main(argv: list[str]) -> None:
    if argv[:1] == ["server"]:
        react(lambda reactor: server(reactor, argv[1], argv[2]))
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--no-postgres", dest="postgres", action="store_false")
    parser.add_argument("--directory", default=None)
    options = parser.parse_args(argv)
    if options.keys is None:
        options.keys = 100_000 if options.quick else 1_000_000
    options.duration = 2.0 if options.quick else 4.0
    options.sample = 500 if options.quick else 2000
    react(lambda reactor: Deferred.fromCoroutine(drive(reactor, options)))


if __name__ == "__main__":
    main(sys.argv[1:])
