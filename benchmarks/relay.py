"""
The relay: C{pgbench} (select-only, 4 clients) against a real PostgreSQL
through two hops, in four set-ups measured in interleaved rounds:

- C{direct}: PostgreSQL itself;
- C{stunnel}: a client C{stunnel} (accepting plain connections on loopback)
  to a server C{stunnel} in front of PostgreSQL, with mutual self-signed P-256
  certificates, each side trusting only the other's;
- C{dwtrust}: a sidecar C{twistd dwtrust --connect} to a daemon
  C{twistd dwtrust --listen ... --forward} in front of PostgreSQL, identities
  made beforehand and the sidecar's key approved with C{--allow}.

Each round runs C{pgbench -S -c 4} for C{--seconds} with persistent
connections, then with a new connection per transaction (C{-C}), for each
set-up in turn (the order rotates between rounds).  Printed: transactions per
second, pgbench's mean latency, and ratios to stunnel; and the CPU seconds
each relay process used per thousand transactions.

    python -m benchmarks.relay [--quick] [--seconds N] [--rounds N]
                               [--profile DIRECTORY]

C{--profile} runs C{py-spy} on both dwtrust processes during one more
persistent run and writes their profiles there.  Needs C{pgbench}, C{initdb}
and C{pg_ctl} (Debian's postgresql) and C{stunnel} (Debian's stunnel4).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _common
from ._common import ROOT

sys.path.insert(0, str(ROOT))

from tests.postgres import USER, PostgreSQLServer, _tool, started
from tests.processes import LOOPBACK, Daemon, free_port, keygen, wait_for

SYSTEMS = ("direct", "stunnel", "dwtrust")
MODES = ("persistent", "connect")
CLIENTS = 4
#: Seconds allowed for a pgbench run beyond its duration.
PGBENCH_SLACK = 120.0


def pgbench(*arguments: str, timeout: float) -> str:
    done = subprocess.run(
        [_tool("pgbench"), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"pgbench {' '.join(arguments)} failed ({done.returncode}):\n"
            f"{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def bench(port: int, seconds: int, connect: bool) -> dict[str, float]:
    """
    One pgbench run against C{port}: its transactions per second and mean
    latency in milliseconds.
    """
    output = pgbench(
        "-n",
        "-S",
        "-c",
        str(CLIENTS),
        "-j",
        "2",
        "-T",
        str(seconds),
        *(["-C"] if connect else []),
        "-h",
        LOOPBACK,
        "-p",
        str(port),
        "-U",
        USER,
        "postgres",
        timeout=seconds + PGBENCH_SLACK,
    )
    tps = re.search(r"^tps = ([\d.]+)", output, re.M)
    latency = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    count = re.search(
        r"^number of transactions actually processed: (\d+)", output, re.M
    )
    if tps is None or count is None:
        raise RuntimeError(f"cannot read pgbench's output:\n{output}")
    return {
        "tps": float(tps.group(1)),
        "latencyMs": float(latency.group(1)) if latency else float("nan"),
        "transactions": int(count.group(1)),
    }


# --- stunnel -------------------------------------------------------------------


def _stunnelConfig(
    directory: Path, name: str, accept: int, connect: int, client: bool
) -> Path:
    config = directory / f"{name}.conf"
    config.write_text(
        "\n".join(
            [
                "foreground = yes",
                "pid =",
                "debug = 3",
                f"output = {directory / name}.log",
                "[pg]",
                f"client = {'yes' if client else 'no'}",
                f"accept = {LOOPBACK}:{accept}",
                f"connect = {LOOPBACK}:{connect}",
                f"cert = {directory / name}.pem",
                f"CAfile = {directory / ('server' if client else 'client')}.crt",
                "verifyPeer = yes",
                "sslVersionMin = TLSv1.3",
                "",
            ]
        )
    )
    return config


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOOPBACK, port)) == 0


@contextlib.contextmanager
def stunnels(directory: Path, target: int) -> Iterator[tuple[int, list[int]]]:
    """
    A client stunnel to a server stunnel in front of C{target}; yields the
    client stunnel's port and both processes' ids.
    """
    stunnel = shutil.which("stunnel") or shutil.which("stunnel4")
    if stunnel is None:
        raise RuntimeError("stunnel was not found: install Debian's stunnel4")
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("client", "server"):
        pem = _common.selfSignedPEM(f"bench-{name}")
        (directory / f"{name}.pem").write_bytes(pem)
        certificate = pem[pem.index(b"-----BEGIN CERTIFICATE-----") :]
        (directory / f"{name}.crt").write_bytes(certificate)
    serverPort, clientPort = free_port(), free_port()
    processes = [
        subprocess.Popen(
            [stunnel, str(_stunnelConfig(directory, name, accept, connect, client))],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, accept, connect, client in (
            ("server", serverPort, target, False),
            ("client", clientPort, serverPort, True),
        )
    ]
    try:
        for port in (serverPort, clientPort):
            wait_for(lambda port=port: _listening(port) or None, f"stunnel on {port}")
        yield clientPort, [p.pid for p in processes]
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- dwtrust -------------------------------------------------------------------


@contextlib.contextmanager
def dwtrustHops(
    directory: Path, work: Path, target: int, source: str | None = None
) -> Iterator[tuple[int, list[int]]]:
    """
    A sidecar daemon to a forwarding daemon in front of C{target}, with the
    identities in C{directory} (made if missing) and their logs in C{work};
    yields the sidecar's local port and both daemons' process ids.

    @param source: another C{src} directory for the daemons to run (to
        compare with an earlier version of the code).
    """
    env = {} if source is None else {"PYTHONPATH": source}
    ledger, billing = directory / "ledger", directory / "billing"
    if not (ledger / "id_dwtrust").exists():
        keygen(ledger, "bench", "postgres", "ecdsa-p256")
    billingKey = (
        (billing / "fingerprint").read_text()
        if (billing / "fingerprint").exists()
        else keygen(billing, "bench", "pgbench", "ecdsa-p256")
    )
    (billing / "fingerprint").write_text(billingKey)
    with (
        Daemon(
            work / "forward",
            "--identity",
            str(ledger),
            "--forward",
            f"tcp:host={LOOPBACK}:port={target}",
            "--allow",
            billingKey,
            env=env,
        ) as forward,
        Daemon(
            work / "sidecar",
            "--identity",
            str(billing),
            "--connect",
            f"tcp:0:interface={LOOPBACK}={forward.address}",
            listen=False,
            env=env,
        ) as sidecar,
    ):
        local = sidecar.port_of("SidecarFactory")
        assert sidecar._process is not None and forward._process is not None
        yield local, [sidecar._process.pid, forward._process.pid]


# --- The run -------------------------------------------------------------------


def profile(
    directory: Path, pids: list[int], port: int, seconds: int, connect: bool
) -> None:
    """
    Run py-spy on C{pids} during one pgbench run; write each profile (the
    hottest functions, by own time and in total) to C{directory}.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    mode = "connect" if connect else "persistent"
    spies = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                "500",
                "--format",
                "raw",
                "--output",
                str(directory / f"{name}-{mode}.raw"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in zip(("sidecar", "forward"), pids, strict=True)
    ]
    time.sleep(1)
    result = bench(port, seconds - 2, connect)
    for spy in spies:
        spy.wait(seconds + 60)
    for name in ("sidecar", "forward"):
        raw = directory / f"{name}-{mode}.raw"
        if raw.exists():
            (directory / f"{name}-{mode}.txt").write_text(summarise(raw))
    print(f"profiled {mode}: {result['tps']:.0f} tps; see {directory}", flush=True)


def summarise(raw: Path, top: int = 40) -> str:
    """
    The hottest functions of a py-spy raw (collapsed stacks) profile: by
    samples on top of the stack (own time) and anywhere in it (total).
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    out = [f"{samples} samples", "", "own time:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / samples:5.1f}%  {frame}")
    out += ["", "total time:"]
    for frame, n in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / samples:5.1f}%  {frame}")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--directory", default=None, help="keys (reused)")
    parser.add_argument("--profile", default=None, help="write py-spy profiles here")
    parser.add_argument(
        "--only", nargs="*", choices=SYSTEMS, default=list(SYSTEMS), help="set-ups"
    )
    parser.add_argument(
        "--modes", nargs="*", choices=MODES, default=list(MODES), help="pgbench modes"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="SRC",
        help="also run dwtrust from this src directory (dwtrust-baseline)",
    )
    options = parser.parse_args()
    seconds = options.seconds or (5 if options.quick else 15)
    rounds = options.rounds or (2 if options.quick else 3)
    directory = Path(options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-"))
    directory = directory / "relay"
    directory.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dwtrust-relay-"))
    systems: list[str] = list(options.only)
    if options.baseline:
        systems.append("dwtrust-baseline")
    figures: dict[str, dict[str, list[dict[str, float]]]] = {
        s: {m: [] for m in options.modes} for s in systems
    }
    cpu: dict[str, list[float]] = {s: [] for s in systems}
    server: PostgreSQLServer = started()
    try:
        pgbench(
            "-i", "-q", "-s", "1", "-h", LOOPBACK, "-p", str(server.port), "-U", USER,
            "postgres", timeout=300,
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            ports: dict[str, int] = {"direct": server.port}
            pids: dict[str, list[int]] = {"direct": []}
            if "stunnel" in systems:
                ports["stunnel"], pids["stunnel"] = stack.enter_context(
                    stunnels(work / "stunnel", server.port)
                )
            if "dwtrust" in systems:
                ports["dwtrust"], pids["dwtrust"] = stack.enter_context(
                    dwtrustHops(directory, work / "dwtrust", server.port)
                )
            if options.baseline:
                ports["dwtrust-baseline"], pids["dwtrust-baseline"] = (
                    stack.enter_context(
                        dwtrustHops(
                            directory / "baseline",
                            work / "baseline",
                            server.port,
                            options.baseline,
                        )
                    )
                )
            # Warm up every path (a sidecar pins the daemon's key now).
            for system in systems:
                bench(ports[system], 1, False)
            for number in range(rounds):
                order = (
                    systems[number % len(systems) :] + systems[: number % len(systems)]
                )
                for system in order:
                    for mode in options.modes:
                        before = sum(_common.cpuOf(p) for p in pids[system])
                        result = bench(ports[system], seconds, mode == "connect")
                        used = sum(_common.cpuOf(p) for p in pids[system]) - before
                        if mode == "persistent" and pids[system]:
                            cpu[system].append(1000 * used / result["transactions"])
                        figures[system][mode].append(result)
                        print(
                            f"round {number + 1} {system:16} {mode:10}"
                            f" {result['tps']:9.0f} tps"
                            f" {result['latencyMs']:7.3f} ms",
                            flush=True,
                        )
            if options.profile and "dwtrust" in systems:
                for mode in options.modes:
                    profile(
                        Path(options.profile),
                        pids["dwtrust"],
                        ports["dwtrust"],
                        seconds,
                        mode == "connect",
                    )
    finally:
        server.destroy()
        shutil.rmtree(work, ignore_errors=True)
    report(figures, cpu, seconds, rounds)


def report(
    figures: dict[str, dict[str, list[dict[str, float]]]],
    cpu: dict[str, list[float]],
    seconds: int,
    rounds: int,
) -> None:
    results: dict[str, Any] = {"seconds": seconds, "rounds": rounds, "clients": CLIENTS}
    print()
    print(
        f"pgbench -S -c {CLIENTS}, {rounds} interleaved rounds of {seconds} s"
        " (median, min-max)"
    )
    for mode in next(iter(figures.values())):
        print(f"\n{mode}:")
        reference = figures.get("stunnel", {}).get(mode)
        referenceTps = (
            statistics.median(r["tps"] for r in reference) if reference else 0
        )
        for system, byMode in figures.items():
            runs = byMode[mode]
            tps = [r["tps"] for r in runs]
            latency = statistics.median(r["latencyMs"] for r in runs)
            ratio = statistics.median(tps) / referenceTps if referenceTps else None
            results.setdefault(system, {})[mode] = {
                "tps": statistics.median(tps),
                "tpsMin": min(tps),
                "tpsMax": max(tps),
                "latencyMs": latency,
                "vsStunnel": ratio,
            }
            print(
                f"  {system:16} {statistics.median(tps):9.0f} tps"
                f" ({min(tps):.0f}-{max(tps):.0f})  {latency:7.3f} ms"
                + (f"  {ratio:.2f}x stunnel" if ratio is not None else "")
            )
    print("\nrelay CPU seconds per 1000 transactions (both relay processes):")
    for system, values in cpu.items():
        if values:
            results[system]["cpuPerKiloTransaction"] = statistics.median(values)
            print(f"  {system:16} {statistics.median(values):.3f}")
    _common.emit({"machine": _common.machineInfo(), "results": results})


if __name__ == "__main__":
    main()
