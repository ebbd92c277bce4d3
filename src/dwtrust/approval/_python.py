"""
Approval callbacks: a user's own Python function as an approver.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from ._interface import ApprovalRequest, Decision, IApprover

#: What an approval callback may return: a L{Decision}; L{True} or L{False};
#: L{None} to abstain; or a L{Deferred} or coroutine of one of those.
ApprovalCallback: TypeAlias = Callable[
    [ApprovalRequest],
    Decision | bool | Deferred[Any] | Coroutine[Any, Any, Any] | None,
]


def _callbackFailed(decidedBy: str) -> Decision:
    return Decision(False, "the approval callback failed", decidedBy, remember=False)


@implementer(IApprover)
class CallableApprover:
    """
    Makes an approver of a function that takes an L{ApprovalRequest} and
    returns (or returns a L{Deferred} or coroutine of):

      - a L{Decision}, which stands as it is;
      - L{True} or L{False}, which approves or refuses, and is remembered;
      - L{None}, to abstain and let the next approver decide.

    If the function raises, fails or returns anything else, the failure is
    logged and the key refused, with nothing stored: a broken callback never
    breaks the handshake, and never lets a key in.  When the peer goes away,
    the L{Deferred} the function returned is cancelled.

    @ivar callback: the function.
    @ivar name: who decides, for decisions made from L{True} or L{False}.
    """

    log = Logger()

    def __init__(self, callback: ApprovalCallback, name: str) -> None:
        if not callable(callback):
            raise ValueError(f"the approval callback {name!r} is not callable")
        self.callback = callback
        self.name = name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        return Deferred.fromCoroutine(self._ask(request))

    async def _ask(self, request: ApprovalRequest) -> Decision | None:
        try:
            result = await maybeDeferred(self.callback, request)
        except CancelledError:
            raise
        except Exception:
            self.log.failure(
                "dwtrust: the approval callback {callback} failed about"
                " {fingerprint}; refusing it",
                event="dwtrust.approver.python.failed",
                callback=self.name,
                fingerprint=request.peer.fingerprint,
            )
            return _callbackFailed(self.name)
        if result is None or isinstance(result, Decision):
            return result
        if isinstance(result, bool):
            return Decision(
                result,
                f"{'approved' if result else 'refused'} by {self.name}",
                self.name,
            )
        self.log.error(
            "dwtrust: the approval callback {callback} returned {result!r}, not a"
            " Decision, a bool or None; refusing {fingerprint}",
            event="dwtrust.approver.python.failed",
            callback=self.name,
            result=result,
            fingerprint=request.peer.fingerprint,
        )
        return _callbackFailed(self.name)


def _importable(module: str) -> bool:
    """
    Whether C{module} (a dotted name) can be found, without importing it.
    Its parent packages are imported to look, as C{import} would.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError as e:
        # A parent package is missing; or it imports a module that is, which
        # importing the parent itself will report.
        return e.name != module and not module.startswith(f"{e.name}.")
    except Exception:
        # A parent package fails as it imports: importing it says how.
        return True


def _lookInCurrentDirectory() -> None:
    """
    Let the current directory supply modules, as C{python -m} does, but last
    on C{sys.path}: a file there never shadows an installed module.
    (C{twistd} does not put the current directory on C{sys.path}.)
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def resolveCallback(name: str) -> ApprovalCallback:
    """
    Import the approval callback called C{name} (C{package.module.callable}).
    An object that provides L{IApprover} stands for its C{requestApproval}.

    Modules are looked for on C{sys.path}, then in the current directory (as
    C{python -m} does; C{twistd} does not), never in front of an installed
    module.

    @raise ValueError: if it cannot be imported, or is not callable; its
        message is one line that says which part of C{name} is missing and
        where it was looked for.
    """
    parts = name.split(".")
    if not name or len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(
            f"the approval callback {name!r} must be a dotted name:"
            " python:package.module.callable"
        )
    _lookInCurrentDirectory()
    # The longest prefix of the name that is a module; the rest are
    # attributes.  find_spec tells a missing module from a module that fails
    # as it imports, which must not read as "not found".
    moduleName = ""
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if _importable(candidate):
            moduleName = candidate
            break
    if not moduleName:
        raise ValueError(
            f"cannot import the approval callback {name!r}: there is no module"
            f" {parts[0]!r} on the Python path or in the current directory"
            f" ({os.getcwd()}); run the daemon from the directory that holds"
            f" {parts[0]}, or put that directory on PYTHONPATH"
        )
    try:
        found: object = importlib.import_module(moduleName)
    except Exception as e:
        raise ValueError(
            f"cannot import the approval callback {name!r}: importing"
            f" {moduleName} failed: {type(e).__name__}: {e}"
        ) from None
    where = getattr(found, "__file__", None) or moduleName
    path = moduleName
    for attribute in parts[len(moduleName.split(".")) :]:
        try:
            found = getattr(found, attribute)
        except AttributeError:
            raise ValueError(
                f"cannot import the approval callback {name!r}: {path}"
                f" ({where}) has no {attribute!r}"
            ) from None
        path = f"{path}.{attribute}"
    if IApprover.providedBy(found):
        method: ApprovalCallback = found.requestApproval
        return method
    if not callable(found):
        raise ValueError(
            f"the approval callback {name!r} is not callable:"
            f" it is {type(found).__name__}"
        )
    callback: ApprovalCallback = found
    return callback


class PythonApprover(CallableApprover):
    """
    The approver chosen with C{python:package.module.callable}: a
    L{CallableApprover} of the function of that name.  Its decisions name
    C{python:package.module.callable}.

    @ivar spec: the dotted name.
    """

    def __init__(self, spec: str) -> None:
        """
        @param spec: C{package.module.callable}, with or without the
            C{python:} prefix.  It is imported at once.

        @raise ValueError: if it cannot be imported, or is not callable.
        """
        self.spec = spec.removeprefix("python:")
        super().__init__(resolveCallback(self.spec), f"python:{self.spec}")
