"""
The atheris targets in C{fuzz/} run, each for a short bounded time, so that a
harness that crashes on its first input (or no longer reaches the code it
fuzzes) fails the build instead of lying idle until someone runs C{fuzz/run}.

Each target runs in its own process, as C{fuzz/run} runs it, from an empty
corpus.  It must exit 0 with no finding written, have executed at least a
floor of inputs, and have covered more than it did on its first input: a
harness that returns early, or whose fakes no longer satisfy the code, does
not grow its coverage.

atheris is in the C{test} extra, so this fails (and does not skip) when it is
missing: the fuzz targets are part of what the suite checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
#: Seconds of fuzzing per target (libFuzzer's C{-max_total_time}, which does
#: not count the start-up).
SECONDS = 15
#: Seconds allowed for a whole run, start-up and a loaded machine included.
TIMEOUT = SECONDS + 120
#: The fewest executions each target must reach in L{SECONDS}.  A quiet
#: 2-core machine does about 270,000 (frames) and 17,000 (handshake) in 15 s;
#: these floors leave a tenth and less of that for a loaded one.
FLOORS = {"frames": 10_000, "handshake": 1_000}


def test_everyTargetHasAFloor() -> None:
    """
    Every C{fuzz/fuzz_*.py} target is run here: a new one cannot be left out.
    """
    targets = {p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py")}
    assert targets == set(FLOORS)


def _run(name: str, workdir: Path) -> tuple[int, str]:
    corpus = workdir / "corpus"
    corpus.mkdir()
    env = dict(os.environ)
    # The same dwtrust as the tests import, whatever the current directory.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p
    )
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(FUZZ / f"fuzz_{name}.py"),
                f"-max_total_time={SECONDS}",
                f"-artifact_prefix={workdir}/finding-",
                "-print_final_stats=1",
                # As fuzz/run: room for a largest frame and what comes around it.
                "-max_len=12000",
                str(corpus),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        output = (e.output or b"").decode(errors="replace")
        raise AssertionError(
            f"fuzz_{name} did not finish in {TIMEOUT} s\n{output[-3000:]}"
        ) from None
    return done.returncode, done.stdout.decode(errors="replace")


def _coverage(output: str, stage: str) -> int:
    """
    The coverage libFuzzer reported at C{stage} (C{INITED} or C{DONE}); it
    leaves C{cov:} out when nothing was covered.
    """
    found = re.findall(rf"^#\d+\s+{stage}\b(.*)$", output, re.M)
    assert found, f"no {stage} line in the output:\n{output[-3000:]}"
    covered = re.search(r"\bcov: (\d+)", found[-1])
    return int(covered.group(1)) if covered else 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FLOORS))
def test_targetRuns(tmp_path: Path, name: str) -> None:
    """
    The target runs for L{SECONDS} with no finding, executes at least its
    floor of inputs, and its coverage grows past its first input's.
    """
    status, output = _run(name, tmp_path)
    tail = output[-3000:]
    hint = (
        "\n(atheris is missing: pip install -e '.[test]')"
        if "No module named 'atheris'" in output
        else ""
    )
    findings = sorted(p.name for p in tmp_path.glob("finding-*"))
    assert status == 0 and not findings, (
        f"fuzz_{name} exited {status}, findings {findings}{hint}\n{tail}"
    )
    executed = re.findall(r"^stat::number_of_executed_units:\s*(\d+)", output, re.M)
    executed = executed or re.findall(r"^Done (\d+) runs", output, re.M)
    assert executed, f"fuzz_{name} reported no executions\n{tail}"
    runs = int(executed[-1])
    print(f"fuzz_{name}: {runs} executions in {SECONDS} s")
    assert runs >= FLOORS[name], (
        f"fuzz_{name} executed {runs} inputs in {SECONDS} s,"
        f" fewer than {FLOORS[name]}\n{tail}"
    )
    inited, done = _coverage(output, "INITED"), _coverage(output, "DONE")
    assert done > inited, (
        f"fuzz_{name}'s coverage did not grow past its first input's"
        f" ({inited} -> {done})\n{tail}"
    )
