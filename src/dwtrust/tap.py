"""
The trust daemon, as C{twistd dwtrust}: an authenticated listener that
forwards each trusted connection to a local application, and a client sidecar
that relays local connections to remote dwtrust peers.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import stat as statModule
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import usage
from twisted.python.filepath import FilePath
from zope.interface import alsoProvides, implementer

from . import _limits as limits
from . import _startup
from . import _workers as workers
from ._authority import Decisions
from ._decision import DecisionError, Signers, readOwnerKey, registeredOwners
from ._endpoints import quoteArgument
from ._forward import ForwardingFactory
from ._identity import (
    PRIVATE_KEY_FILE,
    SHORT_NAMES,
    Identity,
    IdentityError,
    IdentityMismatch,
    holdsIdentity,
    permissionAdvice,
)
from ._options import GNUOptions, count, exitForUsage, positive
from ._policy import ApprovalPolicy, PinningPolicy
from ._sidecar import Mapping, SidecarError, SidecarFactory
from ._status import DaemonStatus, StatusService, loopbackByDefault
from ._systemd import ReloadError, ServiceManager
from ._wrap import DEFAULT_DECISION_TIMEOUT, DEFAULT_TIMEOUT, STORE_FILE, Authenticator
from .approval import (
    AllowList,
    ChainApprover,
    approverFromSpecs,
    checkApproverSpecs,
    readAllowEntries,
    redactSpec,
)
from .approval._limits import (
    DEFAULT_MAX_APPROVER_CALLS,
    ApproverLimits,
    KnownSources,
    LimitedApprover,
)
from .approval._owners import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_PER_SOURCE,
    DEFAULT_PENDING_RESERVE,
    DEFAULT_REQUEST_TTL,
    OwnersApprover,
    announceFleetRequests,
)
from .control import (
    ControlBus,
    ControlLimits,
    ControlMessage,
    ControlPolicy,
    OwnersOnlyPolicy,
    controlFactory,
)
from .control._server import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FIELDS,
    DEFAULT_MAX_MESSAGE,
    DEFAULT_MAX_PER_KEY,
)
from .provisioning import (
    JoinError,
    JoinToken,
    Provisioning,
    readJoinToken,
    readSecretFile,
)
from .store import (
    DEFAULT_POOL_SIZE,
    AnyStore,
    IStoreEvents,
    KeyRecord,
    StoreError,
    openStoreAtStartup,
)
from .store._newest import NEWEST_FILE, NewestDecisions, NewestError

DEFAULT_IDENTITY = os.path.join("~", ".dwtrust")
DEFAULT_LISTEN = "tcp:7443"
DEFAULT_FORWARD = "tcp:host=127.0.0.1:port=8080"
CONTROL_SOCKET = "control.sock"
#: The names a new identity gets when none are given.
DEFAULT_ORG = "local"
DEFAULT_SERVICE = "dwtrust"

log = Logger()


_positive = positive
_count = count


class Options(GNUOptions):
    programName = "twistd dwtrust"
    synopsis = "[options]"
    longdesc = (
        "Run the dwtrust trust daemon: listen for dwtrust connections, "
        "authenticate each peer, and forward trusted connections to a local "
        "application. Unknown keys wait for the owners' approval, given with "
        "`dwtrust approve` over the control endpoint. With --connect it is "
        "also (or, without --listen, only) a client sidecar. With no options "
        f"it creates an identity in ~/.dwtrust ({DEFAULT_ORG}/{DEFAULT_SERVICE}), "
        f"listens on {DEFAULT_LISTEN} and forwards to 127.0.0.1:8080."
    )
    optParameters: list[list[Any]] = [
        ["identity", "i", DEFAULT_IDENTITY, "The identity directory."],
        ["org", None, None, f"Organization of a new identity [{DEFAULT_ORG}]."],
        ["service", None, None, f"Service name of a new identity [{DEFAULT_SERVICE}]."],
        [
            "algorithm",
            None,
            "ed25519",
            "Key algorithm of a new identity: " + ", ".join(sorted(SHORT_NAMES)) + ".",
        ],
        [
            "listen",
            "l",
            None,
            f"Endpoint to listen on for dwtrust peers [{DEFAULT_LISTEN}; with"
            " --connect, none unless given].",
        ],
        [
            "control",
            "c",
            None,
            "Endpoint of the control channel, for owners, new instances and"
            f" service routers [unix:IDENTITY/{CONTROL_SOCKET}].",
        ],
        [
            "join",
            None,
            None,
            "Start as a new instance of a running one: - reads a join token"
            " from `dwtrust join-token` on standard input (never give the token"
            " itself: other local users can read a command line). Ignored once"
            " IDENTITY holds the service's key.",
        ],
        [
            "join-file",
            None,
            None,
            "As --join, with the join token read from this file, which only"
            " the daemon's user may read (chmod 600).",
        ],
        [
            "webhook-auth-file",
            None,
            None,
            "Send the value in this file (chmod 600; e.g. `Bearer TOKEN`) as"
            " the Authorization header of every webhook approver's request,"
            " instead of credentials in the URL.",
        ],
        [
            "webhook-auth-env",
            None,
            None,
            "As --webhook-auth-file, from the environment variable of this name.",
        ],
        [
            "store",
            "s",
            None,
            "The trust store: a SQLite file, or a postgresql:// URL for a store"
            f" shared by a fleet of instances [IDENTITY/{STORE_FILE}].",
        ],
        [
            "store-pool",
            None,
            DEFAULT_POOL_SIZE,
            "Connections to a PostgreSQL store, at most.",
            int,
        ],
        ["audit-log", None, None, "Append audit events to this file, as JSON lines."],
        [
            "timeout",
            None,
            DEFAULT_TIMEOUT,
            "Seconds allowed for a handshake.",
            _positive,
        ],
        [
            "decision-timeout",
            None,
            DEFAULT_DECISION_TIMEOUT,
            "Seconds a connection is held while it waits for a decision.",
            _positive,
        ],
        [
            "max-certificate",
            None,
            limits.DEFAULT_MAX_CERTIFICATE,
            "Bytes of a peer's certificate at most (a dwtrust certificate is"
            " under 2.5 KiB).",
            _count,
        ],
        [
            "max-untrusted",
            None,
            limits.DEFAULT_MAX_UNTRUSTED,
            "Connections not yet trusted, at most.",
            _count,
        ],
        [
            "max-untrusted-per-source",
            None,
            limits.DEFAULT_MAX_UNTRUSTED_PER_SOURCE,
            "Connections not yet trusted from one IPv4 /24 or IPv6 /64, at most.",
            _count,
        ],
        [
            "max-waiting-per-key",
            None,
            limits.DEFAULT_MAX_WAITING_PER_KEY,
            "Connections of a key trusted before waiting for a decision, at most.",
            _count,
        ],
        [
            "max-waiting-per-new-key",
            None,
            limits.DEFAULT_MAX_WAITING_PER_NEW_KEY,
            "Connections of a key never trusted waiting for a decision, at most.",
            _count,
        ],
        [
            "max-held-bytes",
            None,
            limits.DEFAULT_MAX_HELD_BYTES,
            "Application bytes held for connections not yet trusted, in total.",
            _count,
        ],
        [
            "max-tls-handshakes",
            None,
            limits.DEFAULT_MAX_TLS_HANDSHAKES,
            "TLS handshakes in progress at most; more wait for a place.",
            _count,
        ],
        [
            "scan-log-interval",
            None,
            limits.DEFAULT_SCAN_LOG_INTERVAL,
            "Seconds between log lines about abandoned handshakes from one source.",
            _positive,
        ],
        [
            "request-ttl",
            None,
            DEFAULT_REQUEST_TTL,
            "Seconds a pending request waits for the owners before it lapses.",
            _positive,
        ],
        ["max-pending", None, DEFAULT_MAX_PENDING, "Pending requests at most.", int],
        [
            "max-pending-per-source",
            None,
            DEFAULT_MAX_PENDING_PER_SOURCE,
            "Pending requests from one address prefix (an IPv4 /24, an IPv6"
            " /64) at most; every approver runs behind this cap and"
            " --max-pending.",
            int,
        ],
        [
            "pending-reserve",
            None,
            None,
            "How many of --max-pending only address prefixes an approved key"
            " connected from may use (0 for none) [a fifth of --max-pending].",
            int,
        ],
        [
            "max-approver-calls",
            None,
            DEFAULT_MAX_APPROVER_CALLS,
            "Webhook and Python approver calls under way at once, at most.",
            int,
        ],
        [
            "control-max-message",
            None,
            DEFAULT_MAX_MESSAGE,
            "Bytes of one control-channel message at most.",
            int,
        ],
        [
            "control-max-fields",
            None,
            DEFAULT_MAX_FIELDS,
            "Fields of one control-channel message at most.",
            int,
        ],
        [
            "control-idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds a control connection of a key that is not an owner's may"
            " stay silent while nothing is being answered.",
            _positive,
        ],
        [
            "control-max-per-key",
            None,
            DEFAULT_MAX_PER_KEY,
            "Control connections at once of one key that is not an owner's.",
            int,
        ],
        [
            "control-max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Control connections at once of all keys that are not owners'.",
            int,
        ],
        [
            "workers",
            None,
            1,
            "Processes that serve the listening ports: a number, or auto for"
            " one per core.  They share the ports and the trust store; one"
            " daemon to its owners (see Workers in docs/daemon.rst).",
            workers.workerCount,
        ],
        [
            "status",
            None,
            None,
            "Serve status, health and metrics over HTTP on this endpoint"
            " (GET /status, /healthz, /metrics); a tcp endpoint that names no"
            " interface listens on 127.0.0.1 only [off].",
        ],
    ]

    optFlags = [
        [
            "no-provisioning",
            None,
            "Admit only the owners on the control endpoint: no join tokens,"
            " no key requests from service routers.",
        ],
        [
            "connect-public",
            None,
            "Let a --connect local endpoint listen on an interface other than"
            " loopback: whoever reaches it speaks to REMOTE as this daemon.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["owners"] = []
        self["approvers"] = []
        self["connect"] = []
        self["forward"] = []
        self["allow"] = []
        #: The --owner files, read again on SIGHUP.
        self["owner-paths"] = []
        #: The join token and the webhook's Authorization value, once read
        #: (see L{_localSecrets}); never options, which a log may show.
        self.joinToken: str | None = None
        self.webhookAuthorization: str | None = None
        #: Whether these are a worker's options (see L{dwtrust._workers}):
        #: its secrets come from the main process, and it does not hold
        #: the identity's lock.
        self.worker = False
        #: The arguments parsed, which the workers parse again.
        self.arguments: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        self.arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_forward(self, endpoint: str) -> None:
        """
        Endpoint of the local application [tcp:host=127.0.0.1:port=8080].
        Repeat for several instances: each connection goes to the next, in
        turn, and to the one after if it cannot be reached.
        """
        self["forward"].append(endpoint)

    opt_f = opt_forward

    def opt_owner(self, path: str) -> None:
        """
        An owner's public key file (OpenSSH format, as `dwtrust keygen`
        writes it); repeat for several owners.
        """
        try:
            with open(os.path.expanduser(path)) as f:
                self["owners"].append(readOwnerKey(f.read()))
            self["owner-paths"].append(os.path.expanduser(path))
        except OSError as e:
            raise usage.UsageError(f"cannot read the owner key {path}: {e}") from None
        except DecisionError as e:
            raise usage.UsageError(f"{path}: {e}") from None

    def opt_approver(self, spec: str) -> None:
        """
        Who decides on unknown keys: owners (the default), auto, known-only,
        deny, webhook:URL or python:module.callable. Repeat to chain them:
        each may decide, or pass the request on to the next.
        """
        self["approvers"].append(spec)

    opt_a = opt_approver

    def opt_connect(self, mapping: str) -> None:
        """
        LOCAL_ENDPOINT=REMOTE_HOST:PORT: listen on LOCAL_ENDPOINT and relay
        each connection to the dwtrust peer at REMOTE (split at the last
        '='; REMOTE may also be a client endpoint description without '=').
        A tcp LOCAL_ENDPOINT listens on 127.0.0.1 unless it names an
        interface; a non-loopback one needs --connect-public. Repeatable.
        """
        try:
            self["connect"].append(Mapping.parse(mapping))
        except SidecarError as e:
            raise usage.UsageError(str(e)) from None

    def opt_allow(self, entry: str) -> None:
        """
        Approve these keys: a public-key file, a file with one public key or
        SHA256: fingerprint per line (# comments), or a SHA256: fingerprint.
        Other keys go on to the approvers. Repeatable; read again on SIGHUP.
        """
        try:
            readAllowEntries([entry])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["allow"].append(entry)

    def postOptions(self) -> None:
        if self["algorithm"] not in SHORT_NAMES:
            raise usage.UsageError(
                f"unknown algorithm {self['algorithm']!r}; choose one of"
                f" {', '.join(sorted(SHORT_NAMES))}"
            )
        if not self["approvers"]:
            self["approvers"] = ["owners"]
        try:
            checkApproverSpecs(self["approvers"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self._localSecrets()
        for name in [
            "max-pending",
            "max-pending-per-source",
            "store-pool",
            "max-approver-calls",
            "control-max-message",
            "control-max-fields",
            "control-max-per-key",
            "control-max-connections",
        ]:
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["pending-reserve"] is None:
            self["pending-reserve"] = (
                self["max-pending"] * DEFAULT_PENDING_RESERVE // DEFAULT_MAX_PENDING
            )
        if not 0 <= self["pending-reserve"] < self["max-pending"]:
            raise usage.UsageError(
                "--pending-reserve must be at least 0 and less than --max-pending"
            )
        if self["listen"] is None and not self["connect"]:
            self["listen"] = DEFAULT_LISTEN
        if not self["forward"]:
            self["forward"] = [DEFAULT_FORWARD]
        self["identity"] = os.path.expanduser(self["identity"])
        if self["control"] is None:
            self["control"] = "unix:" + quoteArgument(
                os.path.join(self["identity"], CONTROL_SOCKET)
            )
        if self.worker:
            return
        server = getattr(self, "parent", None)
        _startup.placeDaemonFiles(server, self["identity"])
        _startup.refuseSecondDaemon(self["control"], self["identity"], server)

    def _localSecrets(self) -> None:
        """
        Take the join token and the webhook's credentials from where only
        this user can read them (standard input, a 0600 file, the
        environment), never from the command line; refuse before anything
        is written or dialled.
        """
        if self.worker:
            return
        joinFile = self["join-file"]
        if joinFile is not None:
            joinFile = os.path.expanduser(joinFile)
            key = os.path.join(os.path.expanduser(self["identity"]), PRIVATE_KEY_FILE)
            if not os.path.lexists(joinFile) and os.path.exists(key):
                # Joined on an earlier start, and the spent token's file
                # since removed: the token would be ignored anyway.
                joinFile = None
        try:
            self.joinToken = readJoinToken(self["join"], joinFile, sys.stdin)
        except JoinError as e:
            raise usage.UsageError(str(e)) from None
        authFile, authEnv = self["webhook-auth-file"], self["webhook-auth-env"]
        if authFile is not None and authEnv is not None:
            raise usage.UsageError(
                "give --webhook-auth-file or --webhook-auth-env, not both"
            )
        if authFile is not None:
            try:
                self.webhookAuthorization = readSecretFile(
                    os.path.expanduser(authFile), "--webhook-auth-file"
                )
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        elif authEnv is not None:
            value = os.environ.get(authEnv, "").strip()
            if not value:
                raise usage.UsageError(
                    f"--webhook-auth-env: the environment variable {authEnv} is"
                    " not set, or empty"
                )
            self.webhookAuthorization = value
        if self.webhookAuthorization is not None:
            if not any(a.startswith("webhook:") for a in self["approvers"]):
                raise usage.UsageError(
                    "--webhook-auth-file and --webhook-auth-env need a"
                    " --approver webhook:URL"
                )
            if not all(
                c.isascii() and " " <= c < "\x7f" for c in self.webhookAuthorization
            ):
                raise usage.UsageError(
                    "the webhook's Authorization value must be one line of"
                    " printable ASCII"
                )


class _DaemonService(MultiService):
    def __init__(
        self,
        identity: Identity,
        store: AnyStore,
        options: Options,
        decisions: Decisions,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        self._identity = identity
        self._store: AnyStore | None = store
        self._options = options
        self._decisions = decisions
        self._owners = decisions.owners
        #: The service of the authenticated listening port, if there is one.
        self.listening: StreamServerEndpointService | None = None
        #: The worker processes, with C{--workers} 2 or more.
        self.workers: workers.WorkerPool | None = None

    def privilegedStartService(self) -> None:
        """
        Listen on every port, or end the start-up with one line: what can
        be checked before twistd forks was checked in L{makeService}; what
        fails here (a port taken since, a lock) ends the daemon as
        L{_startup.startupFailed} says, with no pidfile left behind.
        """
        server = getattr(self._options, "parent", None)
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListenError as e:
            port = os.fsdecode(e.port) if isinstance(e.port, bytes) else e.port
            if e.socketError == "Cannot acquire lock":
                pid = _startup.lockHolder(str(port))
                holder = f" (pid {pid})" if pid is not None else ""
                message = (
                    f"another dwtrust daemon{holder} already serves the identity"
                    f" in {os.path.abspath(self._options['identity'])}: it holds"
                    " the control"
                    f" socket {port}; stop it first, or give another --identity"
                )
            else:
                where = (
                    f"{e.interface} port {port}"
                    if e.interface
                    else f"port {port}"
                    if isinstance(port, int)
                    else f"the UNIX socket {port}"
                )
                reason = getattr(e.socketError, "strerror", None) or e.socketError
                message = f"cannot listen on {where}: {reason}"
            _startup.startupFailed(server, message)
        except Exception as e:
            log.failure("dwtrust: the daemon could not start")
            _startup.startupFailed(server, f"cannot start: {e}")

    def startService(self) -> None:
        """
        Start every part, or none: if one fails (a port that cannot be had),
        stop those already started, close the store, and fail.
        """
        Service.startService(self)
        self._started: list[IService] = []
        try:
            for child in self:
                child.startService()
                self._started.append(child)
        except BaseException:
            self.stopService()
            raise
        if self._options.worker:
            return
        carrying = Deferred.fromCoroutine(self._decisions.carryOver()).addErrback(
            lambda f: log.failure("dwtrust: carrying decisions over failed", f)
        )
        pool = self.workers
        if pool is not None:
            # Workers start once the version 1 decisions are carried over,
            # so that they read the mark that says so.
            carrying.addBoth(lambda _: pool.begin())
        listen = self._options["listen"]
        mappings: list[Mapping] = self._options["connect"]
        # Credentials in a webhook's URL stay out of every log.
        approvers = " then ".join(redactSpec(a) for a in self._options["approvers"])
        doing = []
        if listen is not None:
            doing.append(
                f"listening on {listen}, forwarding to"
                f" {' and '.join(self._options['forward'])}, approvers {approvers}"
            )
        else:
            doing.append("not listening for dwtrust peers")
        if mappings:
            doing.append(
                "client sidecar "
                + ", ".join(f"{m.local} -> {m.remote}" for m in mappings)
            )
        log.info(
            "dwtrust: {identity} ({fingerprint}) {doing}, {owners} owner(s),"
            " control on {control}",
            event="dwtrust.daemon.started",
            identity=self._identity.name,
            fingerprint=self._identity.fingerprint,
            doing=", ".join(doing),
            listen=listen,
            forward=self._options["forward"] if listen is not None else None,
            connect=[{"local": m.local, "remote": m.remote} for m in mappings],
            approvers=approvers,
            owners=len(self._owners),
            control=self._options["control"],
        )
        if any(
            "@" in urlsplit(a.partition(":")[2]).netloc
            for a in self._options["approvers"]
        ):
            log.warn(
                "dwtrust: a webhook URL holds credentials, which every local"
                " user can read in this process's command line; give them with"
                " --webhook-auth-file instead",
                event="dwtrust.daemon.credentials_in_argv",
            )
        if listen is not None:
            self._sayWhatNext()

    def _sayWhatNext(self) -> None:
        """
        Say plainly where the daemon listens, check once that something
        accepts connections at each forwarding target, and, with no owner
        to approve keys, say how to give it one.
        """
        from twisted.internet import reactor

        listen = self._options["listen"]
        # The port, once listening (Twisted keeps it in this Deferred).
        waiting = getattr(self.listening, "_waitingForPort", None)
        if isinstance(waiting, Deferred):
            waiting.addCallback(self._sayWhere, listen)
        for target in self._options["forward"]:
            _startup.probeForward(reactor, target)
        if "owners" in self._options["approvers"] and not len(self._owners):
            directory = self._options["identity"]
            log.warn(
                "dwtrust: no owner is registered, so unknown keys will wait for"
                " approvals nobody can give.  Make an owner's key with"
                " `dwtrust keygen --identity ~/.dwtrust-owner --org {org}"
                " --service owner`, then restart the daemon with"
                " `twistd dwtrust --identity {directory} --owner"
                " ~/.dwtrust-owner/id_dwtrust.pub` and your other options",
                event="dwtrust.daemon.no_owners",
                org=self._identity.org,
                directory=directory,
            )

    def _sayWhere(self, port: Any, listen: str) -> Any:
        where = _startup.describeListening(port)
        log.info(
            "dwtrust: listening for dwtrust peers on {where}{hint}",
            event="dwtrust.daemon.listening",
            where=where,
            hint=(
                f"; to listen on one interface only, give --listen"
                f" {listen}:interface=ADDRESS"
                if where.startswith("every interface")
                and listen.startswith("tcp:")
                and "interface=" not in listen
                else ""
            ),
        )
        return port

    def stopService(self) -> Deferred[None]:
        """
        Stop the parts that started, then close the store.  Stopping twice
        does nothing more.
        """
        if self.running:
            Service.stopService(self)
        started, self._started = getattr(self, "_started", []), []
        stopping = gatherResults(
            [maybeDeferred(child.stopService) for child in reversed(started)]
        )
        store, self._store = self._store, None
        if store is not None:
            self._decisions.stop()
            stopping.addBoth(lambda _: store.close())
            stopping.addBoth(lambda _: self._decisions.newest.close())
        return stopping.addCallback(lambda _: None)


class _AuditLog(Service):
    """
    Appends every dwtrust event (authentication attempts, decisions, control
    messages) to a file as JSON lines: see L{auditLine}.
    """

    def __init__(self, path: str) -> None:
        """
        Start recording at once, so that the events of building the daemon
        (an identity created, an owner registration ignored) are kept too.
        """
        try:
            self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
            os.chmod(path, 0o600)
        except OSError as e:
            raise StartupFailed(
                permissionAdvice(path, "open the audit log", "--audit-log")
                if isinstance(e, PermissionError)
                else f"cannot open the audit log {path}: {e.strerror}"
            ) from None
        self._observer = AuditObserver(self._file)
        globalLogPublisher.addObserver(self._observer)

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self._observer)
        if self._file is not None:
            self._file.close()
            self._file = None
        return super().stopService()  # type: ignore[no-untyped-call]


#: The keys every audit line has, before the event's own fields.
_AUDIT_ENVELOPE = ("time", "event", "level", "text")


def auditLine(event: dict[str, Any]) -> str:
    """
    One audit event as one line of JSON: C{time} (ISO 8601 UTC, to the
    millisecond), C{event} (its name), C{level}, the event's own structured
    fields, and C{text}, the formatted message; none of Twisted's logging
    envelope (C{log_*}, C{__class_uuid__}). A failure is its C{error} text.
    """
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.UTC)
    level = event.get("log_level")
    facts: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event": event.get("event"),
        "level": getattr(level, "name", str(level)),
        "text": _text(event),
    }
    for key, value in event.items():
        if key.startswith(("log_", "__")) or key in _AUDIT_ENVELOPE:
            continue
        facts[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        facts["error"] = failure.getErrorMessage()
    return json.dumps(facts, default=str, sort_keys=False) + "\n"


def _text(event: dict[str, Any]) -> str:
    """
    The event's message: its format filled in directly (which every dwtrust
    event's format allows), else by Twisted's L{formatEvent}.
    """
    text = event.get("log_format")
    if isinstance(text, str) and "log_failure" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


@implementer(ILogObserver)
class AuditObserver:
    """
    A log observer that writes every dwtrust event (those whose C{event}
    starts with C{dwtrust.}) to C{file} as an L{auditLine}, and nothing
    else: one check per event, where a C{FilteringLogObserver} takes
    several.
    """

    def __init__(self, file: IO[str]) -> None:
        self._write = FileLogObserver(file, auditLine)

    def __call__(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if isinstance(name, str) and name.startswith("dwtrust."):
            self._write(event)


class StartupFailed(usage.UsageError):
    """
    The daemon cannot start, for a reason other than its options (a join
    refused, a file it cannot open): exit status 1, not the usage status.
    """


def makeService(options: Options) -> IService:
    """
    Build the daemon.  A bad option is reported as a one-line message and an
    exit status of 2, as while twistd parses options, not a traceback:
    twistd only handles usage errors while it parses options, which is over
    by now.  A L{StartupFailed} is one line too, with status 1.
    """
    try:
        return _makeService(options)
    except StartupFailed as e:
        raise SystemExit(f"twistd dwtrust: {e}") from None
    except usage.UsageError as e:
        raise exitForUsage(options, e) from None


def makeWorkerService(options: Options, adopted: workers.Adopted) -> IService:
    """
    Build a worker's part of the daemon (see L{dwtrust._workers}): the
    listening ports on the sockets it was handed, on the shared store; no
    control channel, status endpoint or provisioning.
    """
    try:
        return _makeService(options, adopted)
    except StartupFailed as e:
        raise SystemExit(f"twistd dwtrust: worker {adopted.index}: {e}") from None
    except usage.UsageError as e:
        raise SystemExit(f"twistd dwtrust: worker {adopted.index}: {e}") from None


def _makeService(options: Options, adopted: workers.Adopted | None = None) -> IService:
    from twisted.internet import reactor

    # Check everything given before creating anything.
    mappings: list[Mapping] = options["connect"]
    try:
        listen = (
            None
            if options["listen"] is None
            else serverFromString(reactor, options["listen"])
        )
        forward = [
            (clientFromString(reactor, target), target) for target in options["forward"]
        ]
        control = serverFromString(reactor, _privateSocket(options["control"]))
    except (ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"bad endpoint description: {e}") from None
    try:
        # A local endpoint that names no interface listens on loopback only.
        mappings = [m.check(reactor, options["connect-public"]) for m in mappings]
    except SidecarError as e:
        raise usage.UsageError(str(e)) from None
    options["connect"] = mappings
    directory = FilePath(options["identity"])
    # Another user's identity directory is refused before anything in it is
    # read; one that cannot be read is refused, never replaced by a new one.
    _checkOwner(directory)
    try:
        holdsIdentity(directory)
    except IdentityError as e:
        raise StartupFailed(str(e)) from None
    # A port another program holds is refused now, before twistd forks: then
    # it is one line and exit status 1, with nothing forked or written.
    try:
        # (A worker's ports are the main process's sockets: nothing to try.)
        if adopted is None and options["listen"] is not None:
            _startup.checkCanListen(reactor, "--listen", options["listen"])
        for m in mappings if adopted is None else []:
            _startup.checkCanListen(reactor, "--connect", m.local)
        if adopted is None:
            _startup.checkCanListen(reactor, "--control", options["control"])
    except _startup.StartupError as e:
        raise StartupFailed(str(e)) from None
    # Whatever the daemon creates from now on (its store and the store's
    # -wal and -shm files, the newest-decisions file, its logs) is its
    # user's alone.
    os.umask(0o077)
    audit = _AuditLog(options["audit-log"]) if options["audit-log"] else None
    if options.joinToken is not None:
        _join(options.joinToken, directory, options["store"])
    # Names given are checked against an existing identity; the defaults only
    # name a new one.
    try:
        fresh = not holdsIdentity(directory)
        identity, created = Identity.loadOrCreate(
            directory,
            options["org"] or (DEFAULT_ORG if fresh else None),
            options["service"] or (DEFAULT_SERVICE if fresh else None),
            options["algorithm"],
        )
    except IdentityMismatch as e:
        raise usage.UsageError(str(e)) from None
    except IdentityError as e:
        raise StartupFailed(str(e)) from None
    if created:
        log.info(
            "dwtrust: created the identity {identity} ({fingerprint}) in {directory}",
            event="dwtrust.identity.created",
            identity=identity.name,
            fingerprint=identity.fingerprint,
            directory=directory.path,
        )
    # A new identity's public files are narrowed too, without a warning.
    _makePrivate(directory, options["store"], warn=not created)
    try:
        store, registrations = openStoreAtStartup(
            options["store"] or directory.child(STORE_FILE).path,
            options["store-pool"],
        )
    except StoreError as e:
        raise StartupFailed(
            _storeAdvice(options["store"] or directory.child(STORE_FILE).path) or str(e)
        ) from None
    owners = Signers(o.publicKey for o in options["owners"])
    for key in registeredOwners(identity, registrations):
        owners.add(key)
    try:
        newest = NewestDecisions.fromPath(
            directory.child(NEWEST_FILE)
            if adopted is None
            else workers.ownNewest(directory, NEWEST_FILE, adopted.index)
        )
    except NewestError as e:
        raise StartupFailed(str(e)) from None
    bus = ControlBus()
    decisions = Decisions(identity, store, owners, newest, bus)
    known = KnownSources()
    try:
        approver = approverFromSpecs(
            options["approvers"],
            OwnersApprover(
                store,
                bus,
                options["request-ttl"],
                options["max-pending"],
                options["max-pending-per-source"],
                known=known,
                reserved=options["pending-reserve"],
            ),
            ApproverLimits(
                options["max-pending-per-source"],
                options["max-pending"],
                options["pending-reserve"],
                options["max-approver-calls"],
                options["request-ttl"],
            ),
            known,
            webhookAuthorization=options.webhookAuthorization,
        )
    except ValueError as e:
        raise usage.UsageError(str(e)) from None
    if isinstance(approver, LimitedApprover):
        bus.watch(approver.heard)
    clock = IReactorCore(reactor)
    policy = ApprovalPolicy(store, approver, identity, bus=bus, decisions=decisions)
    policy.approvedFrom = known.add
    authenticator = Authenticator(
        identity,
        policy,
        PinningPolicy(store),
        clock,  # type: ignore[arg-type]
        options["timeout"],
        options["decision-timeout"],
        _limitsOf(options),
    )
    decisions.sessions = authenticator.sessionsOf
    if options["workers"] > 1 and not IStoreEvents.providedBy(store):
        # The processes share a SQLite store: each watches it for the
        # others' changes (see dwtrust._workers).
        alsoProvides(store, IStoreEvents)
    if IStoreEvents.providedBy(store):
        store.watch(decisions.fromFleet)
        if adopted is None:
            announceFleetRequests(store, bus, identity.name)
    daemon = _DaemonService(identity, store, options, decisions)
    if audit is not None:
        audit.setServiceParent(daemon)  # type: ignore[no-untyped-call]
    if adopted is not None and adopted.listen is not None:
        listen = adopted.endpoint(reactor, adopted.listen)  # type: ignore[arg-type]
    if listen is not None:
        port = StreamServerEndpointService(
            authenticator.serverEndpoint(listen),
            ForwardingFactory(forward),
        )
        daemon.listening = port
        # Fail at start-up, rather than run without a port, if we cannot listen.
        port._raiseSynchronously = True
        port.setServiceParent(daemon)
    locals_: list[StreamServerEndpointService] = []
    for number, mapping in enumerate(mappings):
        remote = authenticator.clientEndpoint(
            clientFromString(reactor, mapping.remoteDescription), mapping.remote
        )
        local = StreamServerEndpointService(
            serverFromString(reactor, mapping.local)
            if adopted is None
            else adopted.endpoint(reactor, adopted.connect[number]),  # type: ignore[arg-type]
            SidecarFactory(remote, mapping.remote, clock),  # type: ignore[arg-type]
        )
        local._raiseSynchronously = True
        local.setServiceParent(daemon)
        locals_.append(local)
    if adopted is not None:
        _operations(options, daemon, identity, store, decisions, policy)
        return daemon
    provisioning = (
        None
        if options["no-provisioning"]
        else Provisioning(
            identity,
            store,
            bus,
            clock,  # type: ignore[arg-type]
            options["request-ttl"],
            options["max-pending"],
            options["max-pending-per-source"],
            options["owners"],
            decisions=decisions,
        )
    )
    controlAuthenticator = Authenticator(
        identity,
        OwnersOnlyPolicy(owners) if provisioning is None else ControlPolicy(),
        None,
        clock,  # type: ignore[arg-type]
        limits=_limitsOf(options),
    )
    controlPort = StreamServerEndpointService(
        controlAuthenticator.serverEndpoint(control),
        controlFactory(
            decisions,
            bus,
            provisioning,
            ControlLimits(
                options["control-max-message"],
                options["control-max-fields"],
                options["control-idle-timeout"],
                options["control-max-per-key"],
                options["control-max-connections"],
            ),
        ),
    )
    controlPort._raiseSynchronously = True
    controlPort.setServiceParent(daemon)
    TimerService(
        min(60.0, options["request-ttl"] / 4), _expire, store, bus, identity.name
    ).setServiceParent(daemon)
    status = DaemonStatus(
        identity,
        _version(),
        store,
        decisions,
        authenticator,
        controlAuthenticator,
        reactor.seconds,
    )
    if options["status"] is not None:
        _serveStatus(options["status"], status, daemon)
    if options["workers"] > 1:
        daemon.workers = workers.WorkerPool(
            options["workers"],
            options.arguments,
            options.webhookAuthorization,
            daemon.listening,
            locals_,
        )
        daemon.workers.setServiceParent(daemon)  # type: ignore[no-untyped-call]
        status.workerPids = daemon.workers.pids
    _operations(options, daemon, identity, store, decisions, policy)
    return daemon


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dwtrust")
    except PackageNotFoundError:
        return "unknown"


def _serveStatus(description: str, status: DaemonStatus, daemon: MultiService) -> None:
    """
    Serve C{--status}: loopback unless the description names an interface.
    """
    from twisted.internet import reactor

    try:
        endpoint = serverFromString(reactor, loopbackByDefault(description, reactor))
    except (ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--status: bad endpoint description: {e}") from None
    serving = StatusService(endpoint, status)
    serving.setServiceParent(daemon)  # type: ignore[no-untyped-call]
    roles = {ForwardingFactory: "listen", SidecarFactory: "connect"}
    for child in daemon:
        if isinstance(child, StreamServerEndpointService):
            role = roles.get(type(child.factory), "control")
            status.ports.append((role if child is not serving else "status", child))


def _operations(
    options: Options,
    daemon: MultiService,
    identity: Identity,
    store: AnyStore,
    decisions: Decisions,
    policy: ApprovalPolicy,
) -> None:
    """
    The --allow list, ahead of the approvers, and the service manager's
    part: systemd readiness, and reloading owners and the --allow list on
    SIGHUP.  Started last, so that READY=1 means every port is bound.
    """
    from twisted.internet import reactor

    allowList = None
    if options["allow"]:
        try:
            allowList = AllowList.fromEntries(options["allow"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        policy.approver = ChainApprover([allowList, policy.approver])
        log.info(
            "dwtrust: {allowed} key(s) on the allow list, approved ahead of the"
            " approvers",
            event="dwtrust.allow.loaded",
            allowed=len(allowList),
            entries=list(allowList.entries),
        )

    async def reload() -> None:
        await _reload(options, identity, store, decisions, allowList)
        workers.reloadWorkers(daemon)

    manager = ServiceManager(reload, reactor.callFromThread)  # type: ignore[attr-defined]
    manager.setServiceParent(daemon)  # type: ignore[no-untyped-call]


async def _reload(
    options: Options,
    identity: Identity,
    store: AnyStore,
    decisions: Decisions,
    allowList: AllowList | None,
) -> None:
    """
    Read the owners (the --owner files and those registered in the store)
    and the --allow entries again, all or nothing, and log what changed.
    Open connections are not touched.

    @raise ReloadError: if a file cannot be read or the store cannot be
        asked; nothing is changed then.
    """
    wanted = {}
    for path in options["owner-paths"]:
        try:
            with open(path) as f:
                key = readOwnerKey(f.read()).publicKey
        except OSError as e:
            raise ReloadError(
                f"cannot read the owner key {path}: {e.strerror}"
            ) from None
        except DecisionError as e:
            raise ReloadError(f"{path}: {e}") from None
        wanted[key.fingerprint] = key
    try:
        registrations = await store.owners()
    except StoreError as e:
        raise ReloadError(f"cannot read the owners in the store: {e}") from None
    for key in registeredOwners(identity, registrations):
        wanted[key.fingerprint] = key
    allowed: frozenset[str] = frozenset()
    if allowList is not None:
        try:
            allowed = readAllowEntries(allowList.entries)
        except ValueError as e:
            raise ReloadError(str(e)) from None
    owners = decisions.owners
    added = sorted(f for f in wanted if f not in owners)
    removed = sorted(k.fingerprint for k in owners if k.fingerprint not in wanted)
    for fingerprint in added:
        owners.add(wanted[fingerprint])
        decisions.signers.add(wanted[fingerprint])
    for fingerprint in removed:
        owners.discard(fingerprint)
        if fingerprint != identity.fingerprint:
            decisions.signers.discard(fingerprint)
    allowAdded: list[str] = []
    allowRemoved: list[str] = []
    if allowList is not None:
        allowAdded = sorted(allowed - allowList.fingerprints)
        allowRemoved = sorted(allowList.fingerprints - allowed)
        allowList.replace(allowed)
    log.info(
        "dwtrust: reloaded: {owners} owner(s) ({owners_added} added,"
        " {owners_removed} removed), {allowed} key(s) on the allow list"
        " ({allow_added} added, {allow_removed} removed)",
        event="dwtrust.reloaded",
        owners=len(owners),
        owners_added=len(added),
        owners_removed=len(removed),
        added_owners=added,
        removed_owners=removed,
        allowed=len(allowList) if allowList is not None else 0,
        allow_added=len(allowAdded),
        allow_removed=len(allowRemoved),
        added_allowed=allowAdded,
        removed_allowed=allowRemoved,
    )


def _limitsOf(options: Options) -> limits.Limits:
    """
    The limits the options give (see the "Limits" section of
    C{docs/daemon.rst}).
    """
    return limits.Limits(
        maxCertificate=options["max-certificate"],
        maxUntrusted=options["max-untrusted"],
        maxUntrustedPerSource=options["max-untrusted-per-source"],
        maxWaitingPerKey=options["max-waiting-per-key"],
        maxWaitingPerNewKey=options["max-waiting-per-new-key"],
        maxHeldBytes=options["max-held-bytes"],
        maxTLSHandshakes=options["max-tls-handshakes"],
        scanLogInterval=options["scan-log-interval"],
    )


def _privateSocket(description: str) -> str:
    """
    A C{unix:} endpoint description with C{mode=600} unless it gives a mode:
    Twisted makes a socket 0666 by default, and the control socket is for
    this user alone.
    """
    if description.startswith("unix:") and ":mode=" not in description:
        return description + ":mode=600"
    return description


def _makePrivate(
    directory: FilePath[str], store: str | None, warn: bool = True
) -> None:
    """
    Make the identity directory C{0700} and the files in it, and a SQLite
    store elsewhere with its C{-wal} and C{-shm} files, C{0600}: no other
    local user may read the trust store or the newest decisions, or reach
    the control socket.  The daemon owns these files, so it narrows a wider
    mode itself (and says so) rather than refusing to start; the private key
    is the exception, refused by L{Identity.load} if others may read it,
    since a key others could read must be replaced, not hidden.

    @param warn: whether to log each file narrowed (not for an identity
        created by this start, whose public files are written C{0644}).

    @raise StartupFailed: if the directory belongs to another user, or a
        mode cannot be set.
    """
    paths = [directory.path]
    if directory.isdir():
        paths += [c.path for c in directory.children()]
    if store is not None and "://" not in store:
        paths += [store, store + "-wal", store + "-shm", store + "-journal"]
    for path in paths:
        try:
            # The directory may be a symbolic link to one; nothing else is
            # followed.
            facts = os.stat(path) if path == directory.path else os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StartupFailed(f"cannot check {path}: {e.strerror}") from None
        if statModule.S_ISDIR(facts.st_mode) and path == directory.path:
            wanted = 0o700
            _checkOwner(directory)
        elif statModule.S_ISREG(facts.st_mode):
            wanted = 0o600
        else:
            # A subdirectory (a router's services) is not the daemon's to
            # change; a socket is replaced at start with mode 0600.
            continue
        mode = statModule.S_IMODE(facts.st_mode)
        if not mode & 0o077:
            continue
        try:
            os.chmod(path, (mode & wanted) or wanted)
        except OSError as e:
            raise StartupFailed(
                f"{path} has mode {mode:04o} and cannot be made private"
                f" (chmod {wanted:o}): {e.strerror}"
            ) from None
        if not warn:
            continue
        log.warn(
            "dwtrust: {path} had mode {old}, readable by other local users;"
            " it is now {new}",
            event="dwtrust.identity.permissions_fixed",
            path=path,
            old=f"{mode:04o}",
            new=f"{statModule.S_IMODE(os.stat(path).st_mode):04o}",
        )


def _checkOwner(directory: FilePath[str]) -> None:
    """
    Refuse an identity directory that belongs to another user, as C{sshd}
    refuses another user's C{~/.ssh}: before anything in it is read, so
    that one this user cannot read is never taken for an empty one.

    @raise StartupFailed: if it does, or cannot be looked at.
    """
    try:
        facts = os.stat(directory.path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StartupFailed(
            permissionAdvice(directory.path, "read the identity in")
            if isinstance(e, PermissionError)
            else f"cannot check {directory.path}: {e.strerror}"
        ) from None
    if statModule.S_ISDIR(facts.st_mode) and facts.st_uid != os.geteuid():
        raise StartupFailed(
            f"the identity directory {directory.path} belongs to another user"
            f" ({_userName(facts.st_uid)}) and this daemon runs as"
            f" {_userName(os.geteuid())}; run it as the directory's owner"
            " (runuser -u USER --, or User= in a systemd unit), or give"
            " another --identity"
        )


def _userName(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def _storeAdvice(store: str) -> str | None:
    """
    For a SQLite store that could not be opened: which path this user may
    not read or write, whose it is, and what to do; L{None} if permissions
    are not the cause (or the store is PostgreSQL's).
    """
    if "://" in store:
        return None
    path = os.path.abspath(store)
    exists = os.path.lexists(path)
    target = path if exists else os.path.dirname(path)
    wanted = os.R_OK | os.W_OK if exists else os.W_OK | os.X_OK
    if os.access(target, wanted, effective_ids=os.access in os.supports_effective_ids):
        return None
    return permissionAdvice(
        path, "open the trust store" if exists else "create the trust store", "--store"
    )


def _join(token: str, directory: FilePath[str], store: str | None) -> None:
    """
    Make C{directory} an instance of the service a join token names, with
    C{dwtrust clone}, before the reactor runs; or nothing, if it already
    holds that service's key (a restart with the same command line).
    """
    try:
        parsed = JoinToken.parse(token)
    except JoinError as e:
        raise usage.UsageError(f"--join: {e}") from None
    try:
        joined = holdsIdentity(directory)
        existing = Identity.load(directory) if joined else None
    except IdentityError as e:
        raise usage.UsageError(str(e)) from None
    if existing is not None:
        if existing.fingerprint != parsed.fingerprint:
            raise usage.UsageError(
                f"--join: {directory.path} holds {existing.name}"
                f" {existing.fingerprint}, not the key the token names"
                f" ({parsed.fingerprint})"
            )
        log.info(
            "dwtrust: {directory} already holds {identity}; the join token is not used",
            event="dwtrust.join.skipped",
            directory=directory.path,
            identity=existing.name,
        )
        return
    command = [sys.executable, "-m", "dwtrust.cli", "clone", "--join", "-"]
    command += ["--identity", directory.path]
    if store is not None and "://" not in store:
        command += ["--store", store]
    # The token goes through a pipe, not the command line, which other
    # local users can read.
    cloning = subprocess.run(
        command, input=token, capture_output=True, text=True, check=False
    )
    if cloning.returncode != 0:
        lines = cloning.stderr.strip().splitlines() or ["dwtrust clone failed"]
        raise StartupFailed("--join: " + " ".join(lines).removeprefix("dwtrust: "))
    log.info(
        "dwtrust: joined: {directory} now holds the service's key (token {token_id})",
        event="dwtrust.join.joined",
        directory=directory.path,
        token_id=parsed.tokenId[:8],
        output=cloning.stdout.strip(),
    )


def _expire(store: AnyStore, bus: ControlBus, service: str) -> Deferred[None]:
    def expired(lapsed: list[KeyRecord]) -> None:
        for record in lapsed:
            bus.publish(
                ControlMessage.about(
                    "expired",
                    service,
                    record,
                    source=record.source,
                    requestId=record.requestId,
                    reason="the request lapsed without a decision",
                )
            )

    def failed(failure: Any) -> None:
        log.failure("dwtrust: expiring pending requests failed", failure)

    return store.expirePending(time.time()).addCallbacks(expired, failed)
