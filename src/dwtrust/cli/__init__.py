"""
The C{dwtrust} command.

    dwtrust keygen --identity DIR --org ORG --service NAME [--algorithm ALG] [--json]
    dwtrust show --identity DIR [--json]
    dwtrust connect --identity DIR [--strict] [--expect ORG/NAME] HOST:PORT
    dwtrust forget --identity DIR HOST:PORT
    dwtrust pin --identity DIR [--replace] HOST:PORT PUBKEY_FILE
    dwtrust instantiate --identity CLIENT_DIR --server-identity NEW_SERVER_DIR
        --org ORG --service NAME [--algorithm ALG] [--store CLIENT_STORE]

An owner's commands, over a service's control endpoint:

    dwtrust pending --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust approve --control ENDPOINT --identity OWNER_DIR [--reason TEXT] ID
    dwtrust deny --control ENDPOINT --identity OWNER_DIR [--reason TEXT] [--yes] ID
    dwtrust block --control ENDPOINT --identity OWNER_DIR [--yes] ID_OR_FINGERPRINT
    dwtrust revoke --control ENDPOINT --identity OWNER_DIR [--yes] FINGERPRINT
    dwtrust peers --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust watch --control ENDPOINT --identity OWNER_DIR [--json]
    dwtrust join-token --control ENDPOINT --identity OWNER_DIR [--ttl 10m]

Options and arguments may come in any order (docs/cli.rst); a usage error
exits 2 with one line.

Provisioning (see L{dwtrust.provisioning}):

    dwtrust clone (--join - | --join-file PATH) --identity NEW_DIR [--store PATH]
    dwtrust request-key --identity ROUTER_DIR [--into DIR] HOST:PORT
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python import usage
from twisted.python.failure import Failure

from .._identity import IdentityError
from .._options import GNUOptions, reportUsageError
from .._protocol import HandshakeFailed
from ..control import DecisionRefused
from ..control._protocol import NotAnOwner
from ..provisioning import JoinRefused, KeyRequestRefused
from ._admin import AddOwnerOptions, MigrateOptions, _addOwner, migrate
from ._common import FAILED, OK, REFUSED, USAGE, CommandError, isoTime
from ._connect import (
    ConnectOptions,
    ForgetOptions,
    PinOptions,
    _explainRefusal,
    _forget,
    _pin,
    connect,
)
from ._keys import KeygenOptions, ShowOptions, keygen, show
from ._owners import (
    ApproveOptions,
    BlockOptions,
    DenyOptions,
    JoinTokenOptions,
    NoMatch,
    PeersOptions,
    PendingOptions,
    RevokeOptions,
    WatchOptions,
    _control,
    _ControlOptions,
    _decideCommand,
    _DecideOptions,
    controlAddress,
    decisionJSON,
    describeDecision,
    formatMessage,
    formatPeers,
    formatPending,
    formatTable,
    listingJSON,
    resolve,
)
from ._provisioning import (
    CloneOptions,
    InstantiateOptions,
    RequestKeyOptions,
    _clone,
    _instantiate,
    _requestKey,
)


class Options(GNUOptions):
    subCommands: list[list[Any]]
    synopsis = "[--version] COMMAND [options] [arguments]"
    longdesc = (
        "Options and arguments may come in any order after COMMAND; -- ends"
        " the options. Run dwtrust COMMAND --help for a command's options."
    )
    subCommands = [
        ["keygen", None, KeygenOptions, "Create an identity."],
        ["show", None, ShowOptions, "Show an identity."],
        ["connect", None, ConnectOptions, "Connect to a dwtrust service."],
        ["forget", None, ForgetOptions, "Forget a pinned server key."],
        ["pin", None, PinOptions, "Pin a server's key before connecting."],
        ["pending", None, PendingOptions, "List the requests owners must decide."],
        ["approve", None, ApproveOptions, "Approve a key (signed, as an owner)."],
        ["deny", None, DenyOptions, "Deny a key (signed, as an owner)."],
        ["block", None, BlockOptions, "Block a key, so it raises no requests."],
        ["revoke", None, RevokeOptions, "Revoke an approved key."],
        ["peers", None, PeersOptions, "List the keys with a decision."],
        ["watch", None, WatchOptions, "Print control messages as they arrive."],
        ["add-owner", None, AddOwnerOptions, "Register an owner (break-glass)."],
        ["join-token", None, JoinTokenOptions, "Take a token for a new instance."],
        ["clone", None, CloneOptions, "Become a new instance, with a join token."],
        [
            "request-key",
            None,
            RequestKeyOptions,
            "Ask a service's owners for its key (routers).",
        ],
        ["migrate", None, MigrateOptions, "Create or upgrade a trust store's schema."],
        [
            "instantiate",
            None,
            InstantiateOptions,
            "Create a microserver that trusts this client, and pin it.",
        ],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            names = ", ".join(str(command[0]) for command in self.subCommands)
            raise usage.UsageError(f"give a command: {names}")


def _runReactorCommand(options: usage.Options, err: TextIO, out: TextIO) -> int:
    status = [OK]

    def main(reactor: Any) -> Deferred[None]:
        if isinstance(options, ConnectOptions):
            running: Deferred[Any] = Deferred.fromCoroutine(
                connect(reactor, options, err)
            )
        elif isinstance(options, PinOptions):
            running = Deferred.fromCoroutine(_pin(options, out))
        elif isinstance(options, _ControlOptions):
            running = Deferred.fromCoroutine(_control(reactor, options, out, err))
        elif isinstance(options, AddOwnerOptions):
            running = Deferred.fromCoroutine(_addOwner(options, out))
        elif isinstance(options, InstantiateOptions):
            running = Deferred.fromCoroutine(_instantiate(options, out))
        elif isinstance(options, CloneOptions):
            running = Deferred.fromCoroutine(_clone(reactor, options, out))
        elif isinstance(options, RequestKeyOptions):
            running = Deferred.fromCoroutine(_requestKey(reactor, options, out, err))
        else:
            running = Deferred.fromCoroutine(_forget(options, out))  # type: ignore[arg-type]

        def succeeded(result: object) -> None:
            if isinstance(result, int):
                status[0] = result

        def failed(failure: Failure) -> None:
            # Whatever happens here, the command did not succeed.
            status[0] = FAILED
            if failure.check(DecisionRefused):
                err.write(
                    "dwtrust: the service refused the decision:"
                    f" {failure.getErrorMessage()}\n"
                )
                status[0] = REFUSED
            elif failure.check(JoinRefused, KeyRequestRefused, NotAnOwner):
                err.write(f"dwtrust: refused: {failure.getErrorMessage()}\n")
                status[0] = REFUSED
            elif failure.check(HandshakeFailed):
                err.write(_explainRefusal(failure.value, options))  # type: ignore[arg-type]
                status[0] = REFUSED
            else:
                # CommandError, IdentityError, StoreError, ControlFailed,
                # JoinError and anything unforeseen: one line, status 1.
                err.write(f"dwtrust: {failure.getErrorMessage()}\n")

        return running.addCallbacks(succeeded, failed)

    # react() ends with sys.exit(); the status is ours to choose.
    with contextlib.suppress(SystemExit):
        react(main, [])
    return status[0]


def main(
    argv: Sequence[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """
    Run the C{dwtrust} command; return its exit status.
    """
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        return reportUsageError(e, options, err)
    command = options.subOptions
    try:
        if isinstance(command, KeygenOptions):
            return keygen(command, out)
        if isinstance(command, ShowOptions):
            return show(command, out)
        if isinstance(command, MigrateOptions):
            return migrate(command, out, err)
    except (IdentityError, CommandError) as e:
        err.write(f"dwtrust: {e}\n")
        return FAILED
    return _runReactorCommand(command, err, out)


__all__ = [
    "FAILED",
    "OK",
    "REFUSED",
    "USAGE",
    "CommandError",
    "NoMatch",
    "Options",
    "_DecideOptions",
    "_decideCommand",
    "controlAddress",
    "decisionJSON",
    "describeDecision",
    "formatMessage",
    "formatPeers",
    "formatPending",
    "formatTable",
    "isoTime",
    "listingJSON",
    "main",
    "resolve",
]
