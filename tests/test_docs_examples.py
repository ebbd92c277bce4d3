"""
Every shell and Python example of C{README.md} and C{docs/*.rst} runs as
written.

Each page is one test.  Its examples run in order in one C{bash} (with
C{set -e}), as a reader runs them in one terminal, in a sandbox: a new
temporary directory as the working directory, another as C{HOME}, and this
virtualenv's C{bin} first on C{PATH} (as after the README's quick start).
Python examples run with this virtualenv's Python, in the shell's current
directory.  Whatever the page started (applications, daemons in the
background or daemonized by C{twistd}) is stopped when the page ends.

The examples use fixed loopback ports (7443, 9000, ...), as a reader's would,
so the pages run one after the other (across concurrent runs of this test
too, under a lock), and a page whose port is taken by another program fails
at once, saying so, rather than flaking.

An example that cannot run here is marked by a comment directly before it,
with the reason (see L{tests.docexamples}); there must be few of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from . import docexamples
from .docexamples import Example

#: Seconds one page may take, all its examples together.
PAGE_TIMEOUT = 240.0
#: Seconds allowed for what a page started to stop.
STOP_TIMEOUT = 15.0
#: The fixed ports the examples use; a page that names one needs it free.
PORTS = (7000, 7443, 7444, 8080, 8443, 9000)
#: At most this many examples may be marked as not run, in all.
MAX_NOT_RUN = 10
#: Held while a page runs, so that pages of concurrent runs of this test
#: (two checkouts on one machine, say) take the fixed ports in turn.
LOCK = "/tmp/dwtrust-docs-examples.lock"
#: Lines of a failed page's output shown.
SHOWN_LINES = 200

#: The pages with an example to run (the marks of the others are checked
#: by test_reasons and test_allDeclared).
PAGES = [
    page
    for page in docexamples.pages()
    if any(e.notRun is None for e in docexamples.examples(page))
]


def _id(page: Path) -> str:
    return page.relative_to(docexamples.ROOT).as_posix()


def _portTaken(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
        finally:
            s.close()
    return False


def _script(page: list[Example], blocks: Path) -> str:
    """
    One bash script that runs a page's examples in order, announcing each.
    """
    out = ["set -e"]
    for n, example in enumerate(page, 1):
        head = f"[{n}/{len(page)}] {example.where} ({example.language})"
        if example.notRun is not None:
            out.append(f"echo {shlex.quote(f'>>> {head}: not run: {example.notRun}')}")
            continue
        out.append(f"echo {shlex.quote(f'>>> {head}')}")
        if example.language == "python":
            path = blocks / f"example{n}.py"
            path.write_text(example.code, encoding="utf-8")
            out.append(f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}")
        else:
            out.append(example.code)
    out.append("echo '>>> done'")
    return "\n".join(out) + "\n"


def _inside(pid: int, root: str) -> bool:
    """
    Whether process C{pid} works in C{root} (its current directory is in
    it), as everything a page starts does, daemons included.
    """
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == root or cwd.startswith(root + os.sep)


def _started(root: str) -> list[int]:
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _inside(int(entry), root):
            pids.append(int(entry))
    return pids


def _stop(shell: subprocess.Popen[bytes], root: str) -> list[str]:
    """
    Stop everything the page started: the shell's process group, and every
    process working in the sandbox (daemons leave the group).  Returns what
    had to be killed with SIGKILL.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGTERM)
    for pid in _started(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + STOP_TIMEOUT
    while _started(root) and time.monotonic() < end:
        time.sleep(0.1)
    killed = []
    for pid in _started(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                killed.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGKILL)
    shell.wait()
    return killed


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_page(page: Path) -> None:
    """
    The page's examples run in order, and each succeeds.
    """
    found = docexamples.examples(page)
    unexplained = [e.where for e in found if e.notRun == ""]
    assert not unexplained, f"marked not-run without a reason: {unexplained}"
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _runPage(page, found)


def _runPage(page: Path, found: list[Example]) -> None:
    text = page.read_text(encoding="utf-8")
    for port in PORTS:
        if re.search(rf"\b{port}\b", text) and _portTaken(port):
            pytest.fail(
                f"port {port} is in use by another program; the examples of"
                f" {_id(page)} need it on 127.0.0.1: stop that program and run"
                " this test again"
            )

    # Short paths: a UNIX socket path (~/.dwtrust/control.sock) is at most
    # 107 bytes, whatever TMPDIR says.
    root = os.path.realpath(tempfile.mkdtemp(prefix="dwdoc-", dir="/tmp"))
    try:
        home, work, blocks = (Path(root, x) for x in ("home", "work", "blocks"))
        for d in (home, work, blocks):
            d.mkdir()
        script = blocks / "page.sh"
        script.write_text(_script(found, blocks), encoding="utf-8")
        output = blocks / "output"
        env = dict(os.environ)
        env.update(
            HOME=str(home),
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            PYTHONUNBUFFERED="1",
        )
        for name in ("PYTHONSTARTUP", "PIP_REQUIRE_VIRTUALENV"):
            env.pop(name, None)
        with open(output, "wb") as out:
            shell = subprocess.Popen(
                ["bash", str(script)],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timedOut = False
            try:
                shell.wait(PAGE_TIMEOUT)
            except subprocess.TimeoutExpired:
                timedOut = True
            status = shell.returncode
            killed = _stop(shell, root)
        lines = output.read_text(encoding="utf-8", errors="replace").splitlines()
        ran = [x for x in lines if x.startswith(">>> [")]
        finished = lines[-1:] == [">>> done"] and status == 0 and not timedOut
        if not finished:
            failing = ran[-1] if ran else "(before the first example)"
            why = (
                f"did not finish within {PAGE_TIMEOUT:g} s"
                if timedOut
                else f"exited with status {status}"
            )
            shown = "\n".join(lines[-SHOWN_LINES:])
            example = next(
                (
                    e
                    for e in found
                    if failing.startswith(">>> [") and f" {e.where} " in failing
                ),
                None,
            )
            pytest.fail(
                f"{_id(page)}: the example {failing.removeprefix('>>> ')} {why}"
                + (f"\n--- the example ---\n{example.code}" if example else "")
                + f"--- output (last {SHOWN_LINES} lines) ---\n{shown}",
                pytrace=False,
            )
        assert not killed, f"still running after the page ended: {killed}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_reasons() -> None:
    """
    Every example marked as not run says why, and they are few.
    """
    notRun = [
        e for page in PAGES for e in docexamples.examples(page) if e.notRun is not None
    ]
    unexplained = [e.where for e in notRun if not e.notRun]
    assert not unexplained, f"marked not-run without a reason: {unexplained}"
    assert len(notRun) <= MAX_NOT_RUN, (
        f"{len(notRun)} examples are not run (at most {MAX_NOT_RUN}):\n"
        + "\n".join(f"{e.where}: {e.notRun}" for e in notRun)
    )


def test_allDeclared() -> None:
    """
    No command hides in a literal block with no language, where this test
    would not find it.
    """
    hidden = [where for page in PAGES for where in docexamples.undeclared(page)]
    assert not hidden, (
        f"commands in literal blocks (use code-block:: console): {hidden}"
    )


def test_found() -> None:
    """
    The examples are found: the README's shell and Python ones, and a
    console block's commands without their output.
    """
    readme = docexamples.examples(docexamples.ROOT / "README.md")
    assert {e.language for e in readme} == {"shell", "python"}
    assert docexamples.consoleCommands(
        "$ dwtrust keygen \\\n    --org acme\norganization: acme\n$ ls\nout\n"
    ) == ("dwtrust keygen \\\n    --org acme\nls\n")
