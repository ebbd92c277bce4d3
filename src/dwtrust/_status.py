"""
Status, health and metrics: the counts a server side of an
L{Authenticator <dwtrust.Authenticator>} keeps (L{Metrics}), and the
daemon's read-only HTTP endpoint (C{twistd dwtrust --status}) that serves
them as JSON (C{/status}), as a health check (C{/healthz}) and in the
Prometheus text exposition format (C{/metrics}).

Counting costs the handshake an integer increment or two; everything else
(gauges, the store's pending requests) is read when the endpoint is asked.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

if TYPE_CHECKING:
    from ._authority import Decisions
    from ._identity import Identity
    from ._wrap import Authenticator
    from .store import ITrustStore

#: The upper bounds, in seconds, of the decision-latency histogram's
#: buckets: machine approvers answer in milliseconds, owners in minutes.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)

#: The refusal reason of a connection closed before TLS because a limit
#: was reached (see L{dwtrust.Limits}); the other reasons are the handshake's
#: error codes.
LIMITED = "limited"

#: The content type of the Prometheus text exposition format 0.0.4.
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@define
class Histogram:
    """
    A cumulative histogram of seconds, as Prometheus keeps them.
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """
        Each bucket's C{le} label and the count at or below it, C{+Inf} last.
        """
        result, running = [], 0
        for bound, count in zip([*self.bounds, None], self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound is None else _number(bound), running))
        return result


@define
class Metrics:
    """
    What the server side of an authenticator counts: handshakes by outcome,
    open connections, and how long trust decisions take.

    @ivar accepted: handshakes that ended with the peer trusted.
    @ivar refused: handshakes refused by this side, by reason (an
        L{ErrorCode <dwtrust.ErrorCode>} value, or L{LIMITED}).
    @ivar failed: handshakes that ended otherwise: refused by the peer,
        abandoned, or closed before TLS finished.
    @ivar open: connections open now, trusted or not.
    @ivar latency: seconds from a peer's proof to the decision about it.
    """

    accepted: int = 0
    refused: dict[str, int] = field(factory=dict)
    failed: int = 0
    open: int = 0
    latency: Histogram = field(factory=Histogram)

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


def _number(value: float) -> str:
    """
    A sample value as Prometheus writes it.
    """
    return repr(float(value)) if isinstance(value, float) else str(value)


class Exposition:
    """
    Lines of the Prometheus text format: each metric's C{HELP} and C{TYPE}
    lines, then its samples.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self,
        name: str,
        kind: str,
        help: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP dwtrust_{name} {help}")
        self.lines.append(f"# TYPE dwtrust_{name} {kind}")
        for labels, value in samples:
            self.sample(name, labels, value)

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        where = f"{{{rendered}}}" if rendered else ""
        self.lines.append(f"dwtrust_{name}{where} {_number(value)}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode("utf-8")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@define
class StoreState:
    """
    What the trust store said when asked: whether it answered, and how many
    requests wait for a decision.
    """

    available: bool
    pending: int | None


class DaemonStatus:
    """
    The facts the status endpoint reports, read when it is asked.

    @ivar ports: each listening port's role (C{listen}, C{connect},
        C{control}, C{status}) and the service that listens.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        version: str,
        store: ITrustStore,
        decisions: Decisions,
        authenticator: Authenticator,
        control: Authenticator,
        now: Callable[[], float],
    ) -> None:
        self.identity = identity
        self.version = version
        self.store = store
        self.decisions = decisions
        self.authenticator = authenticator
        self.control = control
        self.now = now
        self.started = now()
        self.ports: list[tuple[str, StreamServerEndpointService]] = []
        #: With C{--workers} 2 or more: the workers' pids, running now.
        self.workerPids: Callable[[], list[int]] | None = None

    def addresses(self) -> list[dict[str, str]]:
        """
        The addresses listened on, by role, as C{host:port} or a UNIX path.
        """
        found = []
        for role, service in self.ports:
            waiting = getattr(service, "_waitingForPort", None)
            port = getattr(waiting, "result", None)
            if IListeningPort.providedBy(port):
                found.append({"role": role, "address": _address(port.getHost())})
        return found

    async def storeState(self) -> StoreState:
        try:
            pending = await self.store.pending()
        except Exception as e:  # any failure means unavailable
            self.log.debug(
                "dwtrust: the status endpoint found the store unavailable: {error}",
                error=str(e),
            )
            return StoreState(False, None)
        return StoreState(True, len(pending))

    async def status(self) -> dict[str, Any]:
        state = await self.storeState()
        facts = {
            "identity": self.identity.name,
            "fingerprint": self.identity.fingerprint,
            "version": self.version,
            "uptime": round(self.now() - self.started, 3),
            "listening": self.addresses(),
            "owners": len(self.decisions.owners),
            "store": {"available": state.available, "pending": state.pending},
        }
        if self.workerPids is not None:
            facts["workers"] = {"main": os.getpid(), "workers": self.workerPids()}
        return facts

    async def metrics(self) -> bytes:
        state = await self.storeState()
        m = self.authenticator.metrics
        admission = self.authenticator.admission
        out = Exposition()
        out.metric(
            "handshakes_total",
            "counter",
            "Handshakes of peers by outcome (accepted, refused by this"
            " service with a reason, or failed otherwise).",
            [
                ({"outcome": "accepted"}, m.accepted),
                *(
                    ({"outcome": "refused", "reason": reason}, count)
                    for reason, count in sorted(m.refused.items())
                ),
                ({"outcome": "failed"}, m.failed),
            ],
        )
        out.metric(
            "connections_open",
            "gauge",
            "Connections of peers open now, trusted or not.",
            [({}, m.open)],
        )
        out.metric(
            "connections_untrusted",
            "gauge",
            "Connections of peers not trusted yet.",
            [({}, admission.untrusted)],
        )
        out.metric(
            "connections_held",
            "gauge",
            "Connections held while they wait for a trust decision.",
            [({}, admission.waitingTotal)],
        )
        out.metric(
            "held_bytes",
            "gauge",
            "Application bytes held for connections not trusted yet.",
            [({}, admission.heldBytes)],
        )
        out.metric(
            "pending_requests",
            "gauge",
            "Requests of unknown keys waiting for the owners (absent while"
            " the store is unavailable).",
            [] if state.pending is None else [({}, state.pending)],
        )
        out.lines.append(
            "# HELP dwtrust_decision_seconds Seconds from a peer's proof of"
            " identity to the decision about it."
        )
        out.lines.append("# TYPE dwtrust_decision_seconds histogram")
        for bound, count in m.latency.cumulative():
            out.sample("decision_seconds_bucket", {"le": bound}, count)
        out.sample("decision_seconds_sum", {}, m.latency.total)
        out.sample("decision_seconds_count", {}, m.latency.count)
        out.metric(
            "store_available",
            "gauge",
            "1 if the trust store answered the last question asked, 0 if not.",
            [({}, int(state.available))],
        )
        out.metric(
            "control_connections",
            "gauge",
            "Connections to the control channel open now.",
            [({}, self.control.metrics.open)],
        )
        out.metric(
            "owners",
            "gauge",
            "Owner keys the control channel admits.",
            [({}, len(self.decisions.owners))],
        )
        out.metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            [({}, round(self.now() - self.started, 3))],
        )
        return out.text()


def _address(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return f"unix:{name}" if name is not None else str(address)


class StatusResource(Resource):
    """
    C{GET /status}, C{/healthz} and C{/metrics}; anything else is 404, and
    any other method 405.
    """

    isLeaf = True

    def __init__(self, status: DaemonStatus) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._status = status

    def render_GET(self, request: Request) -> bytes | int:
        path = request.path
        if path == b"/status":
            self._answer(request, self._json())
        elif path == b"/healthz":
            self._answer(request, self._health())
        elif path == b"/metrics":
            self._answer(request, self._prometheus())
        else:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: try /status, /healthz or /metrics\n"
        return NOT_DONE_YET

    async def _json(self) -> tuple[int, bytes, bytes]:
        body = json.dumps(await self._status.status(), indent=2) + "\n"
        return 200, b"application/json", body.encode("utf-8")

    async def _health(self) -> tuple[int, bytes, bytes]:
        state = await self._status.storeState()
        if state.available:
            return 200, b"text/plain; charset=utf-8", b"ok\n"
        return 503, b"text/plain; charset=utf-8", b"the trust store is unavailable\n"

    async def _prometheus(self) -> tuple[int, bytes, bytes]:
        return 200, PROMETHEUS_TYPE, await self._status.metrics()

    def _answer(self, request: Request, answering: Any) -> None:
        finished: list[object] = []
        request.notifyFinish().addBoth(lambda result: finished.append(result))

        def send(answer: tuple[int, bytes, bytes]) -> None:
            if finished:
                return
            code, kind, body = answer
            request.setResponseCode(code)
            request.setHeader(b"content-type", kind)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            self._status.log.failure("dwtrust: the status endpoint failed", failure)
            if not finished:
                send((500, b"text/plain; charset=utf-8", b"internal error\n"))

        Deferred.fromCoroutine(answering).addCallbacks(send, failed)


#: Connections to the status endpoint at once, at most; more are closed.
MAX_STATUS_CONNECTIONS = 32
#: Seconds a connection to the status endpoint may stay idle.
STATUS_IDLE_TIMEOUT = 30


def statusSite(status: DaemonStatus) -> IProtocolFactory:
    """
    The status endpoint's HTTP site: no tracebacks shown, no access log, at
    most L{MAX_STATUS_CONNECTIONS} connections, each closed after
    L{STATUS_IDLE_TIMEOUT} idle seconds.
    """
    site = _QuietSite(  # type: ignore[no-untyped-call]
        StatusResource(status), timeout=STATUS_IDLE_TIMEOUT
    )
    site.displayTracebacks = False
    site.noisy = False
    return _Limited(site, MAX_STATUS_CONNECTIONS)


class _Limited(WrappingFactory):
    """
    Closes connections beyond C{most} at once.
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, most: int) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.most = most

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.most:
            return None
        return super().buildProtocol(addr)


class _QuietSite(Site):
    """
    A site that logs no access lines: a scrape every few seconds would
    fill the log.
    """

    def log(self, request: Any) -> None:
        pass


class StatusService(StreamServerEndpointService):
    """
    Serves the status endpoint, and logs where once it listens.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, status: DaemonStatus) -> None:
        super().__init__(endpoint, statusSite(status))  # type: ignore[no-untyped-call]
        # Fail at start-up, rather than run without it, if it cannot listen.
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        waiting: Deferred[Any] | None = self._waitingForPort
        if waiting is not None:
            waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        where = _address(port.getHost())
        self.log.info(
            "dwtrust: status, health and metrics on {url}status, /healthz and /metrics",
            event="dwtrust.status.listening",
            address=where,
            url=f"http://{where}/" if not where.startswith("unix:") else where + " ",
        )
        return port


def loopbackByDefault(description: str, reactor: Any) -> str:
    """
    A server endpoint description that listens on 127.0.0.1 (C{::1} for
    C{tcp6}) unless it names an interface.

    @raise ValueError: if it is not a server endpoint description.
    """
    from twisted.internet.endpoints import serverFromString

    endpoint = serverFromString(reactor, description)
    interface = getattr(endpoint, "_interface", None)
    if (
        isinstance(interface, str)
        and interface in ("", "0.0.0.0", "::")
        and "interface=" not in description
    ):
        loopback = "::1" if description.startswith("tcp6:") else "127.0.0.1"
        return description + ":interface=" + loopback.replace(":", "\\:")
    return description
