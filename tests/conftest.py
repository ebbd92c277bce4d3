"""
Settings for the whole test suite.

Short temporary paths: a UNIX socket's path is at most 107 bytes (the size of
C{sun_path}), and many tests put a daemon's control socket,
C{IDENTITY/control.sock}, in a temporary directory (C{tempfile.mkdtemp},
pytest's C{tmp_path}).  Under a long C{TMPDIR} they would fail with "AF_UNIX
path too long".  So when the temporary directory's path is longer than
L{SHORT} bytes, the tests' temporary files go in C{/tmp} instead: this
process's (C{tempfile}, which pytest's C{tmp_path} uses too) and, through
C{TMPDIR}, those of the processes the tests start.
"""

from __future__ import annotations

import os
import tempfile

#: The longest temporary directory path kept: the longest socket path the
#: tests make under it (pytest's own directories, a test's name, an identity
#: directory and C{control.sock}) is about 80 bytes more.
SHORT = 24


def _shortTemporaryDirectory() -> None:
    current = os.path.realpath(tempfile.gettempdir())
    if len(current.encode()) <= SHORT:
        return
    short = "/tmp"
    if not (os.path.isdir(short) and os.access(short, os.W_OK | os.X_OK)):
        return
    tempfile.tempdir = short
    os.environ["TMPDIR"] = short


# At import, before pytest makes its base temporary directory.
_shortTemporaryDirectory()
