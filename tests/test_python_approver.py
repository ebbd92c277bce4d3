"""
Tests for finding a C{python:} approval callback: on the Python path, then in
the current directory (as C{python -m} does, which C{twistd} does not), and
the one-line errors when it is not there.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

from twisted.trial.unittest import SynchronousTestCase

from dwtrust.approval import PythonApprover
from dwtrust.testing import approvalRequest, decide


class CurrentDirectoryTests(SynchronousTestCase):
    """
    C{python:module.callable} finds a module in the current directory, after
    every installed one.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="dwtpy-", dir="/tmp")
        here = os.getcwd()
        os.chdir(self.directory)
        path = list(sys.path)
        modules = set(sys.modules)

        def restore() -> None:
            os.chdir(here)
            sys.path[:] = path
            for name in set(sys.modules) - modules:
                del sys.modules[name]

        self.addCleanup(restore)
        # A name no other test imports.
        self.name = f"policy_{uuid.uuid4().hex[:12]}"

    def write(self, relative: str, text: str) -> None:
        path = os.path.join(self.directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def test_moduleInCurrentDirectory(self) -> None:
        """
        A package in the current directory is found, and its callback runs.
        """
        self.write(f"{self.name}/__init__.py", "")
        self.write(
            f"{self.name}/approval.py",
            "def policy(request):\n    return request.peer.service == 'billing'\n",
        )
        approver = PythonApprover(f"python:{self.name}.approval.policy")
        decision = decide(approver, approvalRequest("acme", "billing"))
        assert decision is not None
        self.assertTrue(decision.approved)

    def test_installedModuleFirst(self) -> None:
        """
        A file in the current directory never shadows an installed module:
        the directory is looked in last.
        """
        # A standard module no test imports, so that it is looked for now.
        self.assertNotIn("colorsys", sys.modules)
        self.write("colorsys.py", "def rgb_to_hls(request):\n    return True\n")
        approver = PythonApprover("python:colorsys.rgb_to_hls")
        import colorsys

        self.assertIs(approver.callback, colorsys.rgb_to_hls)
        self.assertNotIn(self.directory, colorsys.__file__ or "")

    def test_noModule(self) -> None:
        """
        A module that is nowhere is one line naming the missing module, the
        current directory, and PYTHONPATH.
        """
        error = self.assertRaises(
            ValueError, PythonApprover, f"python:{self.name}.approval.policy"
        )
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(f"there is no module {self.name!r}", message)
        self.assertIn(self.directory, message)
        self.assertIn("PYTHONPATH", message)

    def test_noAttribute(self) -> None:
        """
        A module without the callable named says which module, from which
        file, lacks which name.
        """
        self.write(f"{self.name}.py", "def other(request):\n    return None\n")
        error = self.assertRaises(ValueError, PythonApprover, f"{self.name}.policy")
        self.assertEqual(
            str(error),
            f"cannot import the approval callback '{self.name}.policy':"
            f" {self.name} ({os.path.join(self.directory, self.name + '.py')})"
            " has no 'policy'",
        )

    def test_failingImport(self) -> None:
        """
        A module that fails as it imports is not reported as missing: the
        error says what failed, in one line.
        """
        self.write(f"{self.name}.py", "import no_such_module_dwtrust\n")
        error = self.assertRaises(ValueError, PythonApprover, f"{self.name}.policy")
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(f"importing {self.name} failed: ModuleNotFoundError", message)
        self.assertIn("no_such_module_dwtrust", message)
