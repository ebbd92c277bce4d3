"""
Run every benchmark (each in processes of its own), then print the machine,
every figure, the ratios and the targets, as reStructuredText tables.

    benchmarks/run [--quick] [--only NAME ...] [--versions 1 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import ROOT, machineInfo, met, table

BENCHMARKS = (
    "components",
    "connections",
    "endpoints",
    "latency",
    "throughput",
    "idle",
    "store",
    "storm",
    "relay",
    "workers",
)


def run(name: str, arguments: list[str]) -> dict[str, Any] | None:
    print(f"== {name} {' '.join(arguments)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{name}", *arguments],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    result = None
    for line in process.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        else:
            sys.stderr.write(line)
    process.wait()
    print(
        f"== {name}: exit {process.returncode} in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    if result is not None:
        result["seconds"] = time.monotonic() - started
    return result


def summary(machine: dict[str, str], results: dict[str, Any]) -> str:
    out = ["Machine", ""]
    out.append(table(["what", "value"], [[k, v] for k, v in machine.items()]))
    if "connections" in results:
        from . import connections

        out += ["", "Connection rate", "", connections.report(results["connections"])]
    if "components" in results:
        r = results["components"]["results"]
        names = list(r["ecdsa-p256"])
        out += [
            "",
            "Per-connection pieces, CPU microseconds (in process, no profiler)",
            "",
            table(
                ["step", "P-256", "Ed25519"],
                [
                    [n, f"{r['ecdsa-p256'][n]:.0f}", f"{r['ed25519'][n]:.0f}"]
                    for n in names
                ],
            ),
        ]
    if "components" in results and "budget" in results["components"]:
        budget = results["components"]["budget"]
        plain = next(iter(budget.values()))
        out += [
            "",
            "Per-connection budget of a dwtrust server connection (CPU, in process)",
            "",
            table(
                ["piece", "us", "x plain TLS (server side)"],
                [[n, f"{v:.1f}", f"{v / plain:.1%}"] for n, v in budget.items()],
            ),
        ]
    if "endpoints" in results:
        r = results["endpoints"]["results"]
        out += [
            "",
            "Client endpoint string vs the API vs plain TLS (conn/s)",
            "",
            table(
                [
                    "concurrent",
                    "TLS/s",
                    "API/s",
                    "string/s",
                    "string vs TLS",
                    "client CPU ms/conn API / string",
                ],
                [
                    [
                        c,
                        f"{v['tls']['rate']:.0f}",
                        f"{v['api']['rate']:.0f}",
                        f"{v['string']['rate']:.0f}",
                        f"{v['string']['rate'] / v['tls']['rate']:.2f}x",
                        f"{v['api']['clientCpuMs']:.2f} /"
                        f" {v['string']['clientCpuMs']:.2f}",
                    ]
                    for c, v in r.items()
                ],
            ),
        ]
    if "latency" in results:
        from . import latency

        out += ["", "Latency to the first byte", "", latency.report(results["latency"])]
    if "throughput" in results:
        r = results["throughput"]["results"]
        out += [
            "",
            f"Throughput after hand-off ({r['mebibytes']} MiB)",
            "",
            table(
                [
                    "dwtrust MiB/s",
                    "TLS MiB/s",
                    "ratio (>=0.97)",
                    "rounds dwtrust / TLS",
                ],
                [
                    [
                        f"{r['dwtrust']['mibPerSecond']:.0f}",
                        f"{r['tls']['mibPerSecond']:.0f}",
                        f"{r['ratio']:.3f} ({met(r['ratio'] >= 0.97)})",
                        f"{r['dwtrust']['rounds']} / {r['tls']['rounds']}",
                    ]
                ],
            ),
        ]
    if "idle" in results:
        r = results["idle"]["results"]
        rows = [
            [
                name,
                str(r[key]["opened"]),
                f"{r[key]['rssBeforeMiB']:.1f}",
                f"{r[key]['rssAfterMiB']:.1f}",
                f"{r[key]['bytesPerConnection'] / 1024:.1f}",
            ]
            for name, key in (("plain TLS", "tls"), ("dwtrust", "dwtrust"))
        ]
        out += [
            "",
            "Idle connections (server process)",
            "",
            table(["", "open", "RSS before MiB", "RSS after MiB", "KiB/conn"], rows),
            "",
            f"dwtrust / TLS memory per connection: {r['ratio']:.2f}x",
        ]
    if "store" in results:
        r = results["store"]["results"]
        rows = []
        for kind in ("sqlite", "postgresql"):
            for entry in r.get(kind, []):
                rows.append(
                    [
                        kind,
                        f"{entry['keys']:,}",
                        f"{entry['handshakeLookupP50Ms']:.2f}",
                        f"{entry['handshakeLookupP99Ms']:.2f}",
                        f"{entry['random']['p50Ms']:.2f}" if "random" in entry else "-",
                        f"{entry['random']['p99Ms']:.2f}" if "random" in entry else "-",
                        f"{entry['rate']:.0f}",
                        f"{entry['startupSeconds']:.2f}",
                    ]
                )
        out += [
            "",
            "Trust store",
            "",
            table(
                [
                    "store",
                    "keys",
                    "handshake lookup p50 ms",
                    "p99 ms",
                    "random lookup p50 ms",
                    "p99 ms",
                    "conn/s (4 concurrent)",
                    "start-up s",
                ],
                rows,
            ),
        ]
        if "postgresqlError" in r:
            out.append(f"PostgreSQL: {r['postgresqlError']}")
    if "storm" in results:
        from . import storm

        out += ["", storm.report(results["storm"])]
    if "relay" in results:
        r = results["relay"]["results"]
        systems = [s for s in ("direct", "stunnel", "dwtrust") if s in r]
        rows = []
        for mode in ("persistent", "connect"):
            for system in systems:
                figures = r[system].get(mode)
                if figures is None:
                    continue
                ratio = figures.get("vsStunnel")
                rows.append(
                    [
                        mode,
                        system,
                        f"{figures['tps']:.0f}",
                        f"{figures['tpsMin']:.0f}-{figures['tpsMax']:.0f}",
                        f"{figures['latencyMs']:.3f}",
                        "-" if ratio is None else f"{ratio:.2f}x",
                    ]
                )
        out += [
            "",
            f"Relay: pgbench -S -c {r['clients']} through two hops"
            f" ({r['rounds']} rounds of {r['seconds']} s; connect = pgbench -C)",
            "",
            table(
                ["mode", "system", "tps", "range", "latency ms", "vs stunnel (>=1)"],
                rows,
            ),
        ]
        cpu = [
            [s, f"{r[s]['cpuPerKiloTransaction']:.3f}"]
            for s in systems
            if "cpuPerKiloTransaction" in r[s]
        ]
        if cpu:
            out += [
                "",
                table(["relay processes", "CPU s per 1000 transactions"], cpu),
            ]
    if "workers" in results:
        w = results["workers"]
        rows = [
            [
                f"--workers {count}",
                f"{r['rate']:.0f}",
                f"{w['ratioToOneWorker'][count]:.2f}x",
                f"{r['serverCpuMs']:.2f}",
                f"{r['serverCores']:.2f}",
                f"{r['clientCpuMs']:.2f}",
            ]
            for count, r in w["results"].items()
        ]
        out += [
            "",
            f"twistd dwtrust --workers ({w['cores']} cores, {w['clients']} client"
            f" processes x {w['concurrency']} concurrent; target 1.8x)",
            "",
            table(
                [
                    "daemon",
                    "conn/s",
                    "vs 1",
                    "daemon cpu/conn ms",
                    "daemon cores",
                    "client cpu/conn ms",
                ],
                rows,
            ),
        ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short pass (connections, latency, storm: under a minute each)",
    )
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    parser.add_argument("--directory", default=None, help="keys and stores (reused)")
    parser.add_argument(
        "--versions",
        nargs="+",
        choices=("1", "2"),
        default=None,
        help="the dwtrust protocol versions connections and latency measure"
        " (default: both)",
    )
    options = parser.parse_args()
    directory = options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-")
    machine = machineInfo()
    print(json.dumps(machine, indent=2), file=sys.stderr)
    results: dict[str, Any] = {}
    arguments = ["--directory", directory] + (["--quick"] if options.quick else [])
    for name in options.only or BENCHMARKS:
        extra = []
        if options.versions and name in ("connections", "latency"):
            extra = ["--versions", *options.versions]
        result = run(name, arguments + extra)
        if result is not None:
            results[name] = result
    command = "benchmarks/run " + " ".join(sys.argv[1:])
    text = f"Command: {command}\n\n" + summary(machine, results)
    print(text)
    if options.output:
        Path(options.output).write_text(
            json.dumps({"machine": machine, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
