"""
Run every benchmark (each in processes of its own), then print the machine,
every figure, the ratios and the targets, as reStructuredText tables.

    benchmarks/run [--quick] [--only NAME ...] [--output FILE]
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

from ._common import ROOT, machineInfo

BENCHMARKS = (
    "components",
    "connections",
    "latency",
    "throughput",
    "idle",
    "store",
    "storm",
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


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)
    ]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append(rule)
    for row in rows:
        lines.append(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        )
    lines.append(rule)
    return "\n".join(lines)


def met(condition: bool) -> str:
    return "met" if condition else "MISSED"


def summary(machine: dict[str, str], results: dict[str, Any]) -> str:
    out = ["Machine", ""]
    out.append(table(["what", "value"], [[k, v] for k, v in machine.items()]))
    if "connections" in results:
        r = results["connections"]["results"]
        rows = []
        for c in r["dwtrust-ecdsa-p256"]:
            d, t, f = (r[n][c] for n in ("dwtrust-ecdsa-p256", "tls", "foolscap"))
            row = [
                c,
                f"{d['rate']:.0f}",
                f"{t['rate']:.0f}",
                f"{f['rate']:.0f}",
                f"{d['rate'] / t['rate']:.2f}x",
                f"{d['rate'] / f['rate']:.1f}x",
                f"{d['serverCpuMs']:.2f} / {t['serverCpuMs']:.2f}",
            ]
            if "dwtrust-ed25519" in r:
                row.insert(4, f"{r['dwtrust-ed25519'][c]['rate']:.0f}")
            rows.append(row)
        headers = [
            "concurrent",
            "dwtrust P-256/s",
            "TLS P-256/s",
            "foolscap/s",
            "vs TLS (>=0.9)",
            "vs foolscap (>=3)",
            "server CPU ms/conn dwtrust / TLS",
        ]
        if "dwtrust-ed25519" in r:
            headers.insert(4, "dwtrust Ed25519/s")
        out += ["", "Connection rate", "", table(headers, rows)]
        if "dwtrust-memstore-ecdsa-p256" in r:
            memory = r["dwtrust-memstore-ecdsa-p256"]
            out += [
                "",
                "Diagnostic: dwtrust P-256 with both stores in memory (no SQLite,"
                " no thread hop)",
                "",
                table(
                    ["concurrent", "conn/s", "vs TLS", "server CPU ms/conn"],
                    [
                        [
                            c,
                            f"{m['rate']:.0f}",
                            f"{m['rate'] / r['tls'][c]['rate']:.2f}x",
                            f"{m['serverCpuMs']:.2f}",
                        ]
                        for c, m in memory.items()
                    ],
                ),
            ]
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
    if "latency" in results:
        r = results["latency"]["results"]
        rows = [
            [
                name,
                f"{r[key]['directMs']:.2f}",
                f"{r[key]['directP99Ms']:.2f}",
                f"{r[key]['delayedMs']:.0f}",
                f"{r[key]['roundTrips']:.2f}",
            ]
            for name, key in (("bare TLS 1.3", "tls"), ("dwtrust", "dwtrust"))
        ]
        out += [
            "",
            f"Latency to first byte (relay: {r['delayMs']:.0f} ms each way)",
            "",
            table(
                ["", "loopback p50 ms", "loopback p99 ms", "relayed ms", "round trips"],
                rows,
            ),
            "",
            f"added round trips: {r['addedRoundTrips']:.2f}"
            f" (target <= 1: {met(round(r['addedRoundTrips']) <= 1)})",
        ]
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
        r = results["storm"]["results"]
        rows = [
            [
                phase,
                f"{r[phase]['maxLagMs']:.0f}",
                f"{r[phase]['p99LagMs']:.1f}",
                f"{r[phase].get('peakRssMiB', r[phase]['rssMiB']):.0f}",
                f"{r[phase]['known']['rate']:.0f}",
                f"{r[phase]['known']['p50Ms']:.1f}",
                f"{r[phase]['known']['p99Ms']:.0f}",
                f"{r[phase]['known']['maxMs']:.0f}",
            ]
            for phase in ("calm", "storm")
        ]
        out += [
            "",
            f"Approval storm ({r['clients']} unknown clients; all pending after"
            f" {r['secondsUntilAllPending']:.1f} s)",
            "",
            table(
                [
                    "phase",
                    "max stall ms",
                    "p99 stall ms",
                    "RSS MiB",
                    "known conn/s",
                    "known p50 ms",
                    "p99 ms",
                    "max ms",
                ],
                rows,
            ),
        ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/run")
    parser.add_argument("--quick", action="store_true", help="a short pass (~2 min)")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON")
    parser.add_argument("--directory", default=None, help="keys and stores (reused)")
    options = parser.parse_args()
    directory = options.directory or tempfile.mkdtemp(prefix="dwtrust-bench-")
    machine = machineInfo()
    print(json.dumps(machine, indent=2), file=sys.stderr)
    results: dict[str, Any] = {}
    arguments = ["--directory", directory] + (["--quick"] if options.quick else [])
    for name in options.only or BENCHMARKS:
        result = run(name, arguments)
        if result is not None:
            results[name] = result
    command = "benchmarks/run" + (" --quick" if options.quick else "")
    text = f"Command: {command}\n\n" + summary(machine, results)
    print(text)
    if options.output:
        Path(options.output).write_text(
            json.dumps({"machine": machine, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
