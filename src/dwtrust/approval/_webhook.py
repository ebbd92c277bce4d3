"""
The webhook approver: POST each request to a URL, and take the decision from
the response, or let the next approver (normally the owners) decide.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from .._bus import ControlMessage
from ._interface import ApprovalRequest, Decision, IApprover

#: Seconds allowed for the whole exchange: connecting, sending, the response.
DEFAULT_WEBHOOK_TIMEOUT = 10.0
#: The largest response body read; a larger one is an error.
MAX_RESPONSE_BYTES = 64 * 1024
#: The longest reason kept from a response (it is logged, stored and sent to
#: the peer).
MAX_REASON_LENGTH = 200


class WebhookError(Exception):
    """
    The webhook did not answer with a decision: the message says why.
    """


def redactURL(url: str) -> str:
    """
    C{url} without its user information, query and fragment, which may hold
    secrets: fit to log.
    """
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def maskURL(url: str) -> str:
    """
    C{url} with every secret it may hold masked, fit to log while still
    showing its shape: the password in its user information and the value
    of every query parameter become C{***}, and the fragment goes:
    C{https://bot:***@host/path?token=***}.
    """
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        hostport = f"{user}{':***' if colon else ''}@{hostport}"
    query = "&".join(
        name + ("=***" if eq else "")
        for name, eq, _ in (p.partition("=") for p in parts.query.split("&") if p)
    )
    return urlunsplit((parts.scheme, hostport, parts.path, query, ""))


def checkWebhookURL(url: str) -> str:
    """
    Check that C{url} can be a webhook's.

    @return: C{url}, unchanged.
    @raise ValueError: if it is not an absolute C{http} or C{https} URL with a
        host, in ASCII, with no spaces.  The message never repeats the URL's
        user information or query.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("the webhook URL is empty")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError(
            "the webhook URL must be ASCII with no spaces or control characters"
            " (percent-encode them)"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(
            "the webhook URL must start with http:// or https://"
            f" (not {parts.scheme + ':' if parts.scheme else 'a relative URL'})"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"the webhook URL {redactURL(url)} has a bad port number")
    if not parts.hostname:
        raise ValueError(f"the webhook URL {redactURL(url)} has no host")
    return url


def _isLoopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def approvalMessage(request: ApprovalRequest) -> dict[str, Any]:
    """
    The JSON object a webhook receives about C{request}: an
    C{approval_requested} control message, with the key as an OpenSSH
    public-key line in C{publicKey}.
    """
    peer = request.peer
    message = ControlMessage.about(
        "approval_requested",
        request.service,
        peer,
        source=request.source,
        reason=f"{peer.name} wants to connect to {request.service}",
    ).asJSON()
    message["publicKey"] = peer.publicKey.openssh()
    return message


@implementer(IBodyProducer)
class _Body:
    """
    A request body sent all at once.
    """

    def __init__(self, content: bytes) -> None:
        self._content = content
        self.length = len(content)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._content)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BoundedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes, as
    L{twisted.web.client.readBody} does without a bound.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(
                WebhookError(f"the response is larger than {self._limit} bytes")
            )
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _readBody(response: IResponse, limit: int = MAX_RESPONSE_BYTES) -> Deferred[bytes]:
    body = _BoundedBody(limit)
    response.deliverBody(body)
    return body.done


def _wrapsCancellation(error: BaseException) -> bool:
    """
    Whether C{error} is, or (as Agent reports it) wraps, a cancellation.
    """
    reasons = getattr(error, "reasons", None)
    return isinstance(error, CancelledError) or (
        isinstance(reasons, list)
        and any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)
    )


def _describe(error: BaseException) -> str:
    """
    A one-line account of why an exchange failed, without a traceback.
    """
    # Agent wraps what went wrong in a list of failures (ResponseFailed,
    # ResponseNeverReceived, RequestGenerationFailed...).
    reasons = getattr(error, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        inner = reasons[0].value
        assert inner is not None
        return _describe(inner)
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text}" if text else name


@implementer(IApprover)
class WebhookApprover:
    """
    POSTs each request to a URL as JSON (see L{approvalMessage}) and reads the
    decision from the response, a JSON object:

      - C{200} with C{"decision"} C{"approve"} or C{"deny"}, and optionally
        C{"reason"} (a string) and C{"remember"} (a boolean, true by
        default), decides;
      - C{202}, or C{200} with C{"decision"} C{"pending"}, abstains: the next
        approver decides (normally the owners, through the CLI);
      - anything else (another status, a body that is not such JSON, a
        timeout, a connection that fails) is logged as a warning, without a
        traceback, and abstains too.

    User information in the URL (C{https://user:password@host/...}) is sent
    as basic authentication.  The URL's user information and query, where
    secrets live, are never logged.  Over plain C{http} to a host other than
    this one, anyone on the path could forge approvals, so a warning says so;
    prefer C{https}.

    @ivar url: the webhook's URL.
    @ivar safeURL: the URL as logged: without user information or query.
    @ivar timeout: seconds allowed for each exchange.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        agent: IAgent | None = None,
        reactor: IReactorTime | None = None,
        timeout: float = DEFAULT_WEBHOOK_TIMEOUT,
        authorization: str | None = None,
    ) -> None:
        """
        @param url: an C{http} or C{https} URL.
        @param authorization: the value of an C{Authorization} header to send
            (C{Bearer TOKEN}, say), read from a file or the environment
            rather than held in C{url}; never logged.
        @param agent: the HTTP client; by default an L{Agent} on C{reactor}
            that checks https certificates and keeps no connection open.
        @param reactor: the reactor for the agent (which needs TCP, and TLS
            for https) and the timeout; by default the global one.
        @param timeout: seconds allowed for each exchange.

        @raise ValueError: if C{url} is not an absolute C{http} or C{https}
            URL, or C{timeout} is not positive.
        """
        self.url = checkWebhookURL(url)
        if not timeout > 0:
            raise ValueError("the webhook timeout must be a positive number of seconds")
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        if agent is None:
            agent = Agent(
                reactor,
                connectTimeout=timeout,
                pool=HTTPConnectionPool(reactor, persistent=False),
            )
        self.safeURL = redactURL(url)
        self.name = f"webhook:{self.safeURL}"
        self.timeout = timeout
        self._agent = agent
        self._reactor = reactor
        # User information becomes basic authentication; the fragment is
        # never sent.
        parts = urlsplit(url)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        self._requestURL = urlunsplit(
            (parts.scheme, hostport, parts.path or "/", parts.query, "")
        ).encode("ascii")
        self._headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"User-Agent": [b"dwtrust"],
        }
        if authorization is not None:
            if userinfo:
                raise ValueError(
                    f"the webhook URL {maskURL(url)} holds credentials, and"
                    " others are given apart from it: give one or the other"
                )
            self._headers[b"Authorization"] = [authorization.encode("ascii")]
        elif userinfo:
            user, _, password = userinfo.partition(":")
            credentials = f"{unquote(user)}:{unquote(password)}".encode()
            self._headers[b"Authorization"] = [
                b"Basic " + base64.b64encode(credentials)
            ]
        if parts.scheme.lower() == "http" and not _isLoopback(parts.hostname or ""):
            self.log.warn(
                "dwtrust: the approval webhook {url} is plain http: anyone on"
                " the path can forge its decisions; use https",
                event="dwtrust.approver.webhook.insecure",
                url=self.safeURL,
            )

    def __repr__(self) -> str:
        return f"<WebhookApprover {self.safeURL}>"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision | None]:
        return Deferred.fromCoroutine(self._ask(request))

    async def _ask(self, request: ApprovalRequest) -> Decision | None:
        body = json.dumps(approvalMessage(request), sort_keys=True).encode("utf-8")
        exchange = Deferred.fromCoroutine(self._exchange(body))
        exchange.addTimeout(self.timeout, self._reactor)
        try:
            decision = await exchange
        except CancelledError:
            # The peer went away: nothing to report.
            raise
        except Exception as e:
            if isinstance(e, TimeoutError):
                error = f"TimeoutError: no answer within {self.timeout} seconds"
            else:
                error = _describe(e)
            self.log.warn(
                "dwtrust: the approval webhook {url} gave no decision about"
                " {fingerprint} ({error}); passing it on",
                event="dwtrust.approver.webhook.failed",
                url=self.safeURL,
                fingerprint=request.peer.fingerprint,
                error=error,
            )
            return None
        if decision is None:
            self.log.info(
                "dwtrust: the approval webhook {url} left {fingerprint} pending",
                event="dwtrust.approver.webhook.pending",
                url=self.safeURL,
                fingerprint=request.peer.fingerprint,
            )
        return decision

    async def _exchange(self, body: bytes) -> Decision | None:
        try:
            response = await self._agent.request(
                b"POST", self._requestURL, Headers(self._headers), _Body(body)
            )
            content = await _readBody(response)
        except Exception as e:
            # Agent reports a cancelled request as a failed one; say it was
            # cancelled, so that a timeout is told from a failure.
            if _wrapsCancellation(e):
                raise CancelledError() from None
            raise
        if response.code == 202:
            return None
        if response.code != 200:
            raise WebhookError(f"HTTP status {response.code}")
        return self._parse(content)

    def _parse(self, content: bytes) -> Decision | None:
        try:
            answer = json.loads(content)
        except ValueError:
            raise WebhookError("the response is not JSON") from None
        if not isinstance(answer, dict):
            raise WebhookError("the response is not a JSON object")
        choice = answer.get("decision")
        if choice == "pending":
            return None
        if choice not in ("approve", "deny"):
            raise WebhookError(
                'the response\'s "decision" is not "approve", "deny" or "pending"'
            )
        approved = choice == "approve"
        reason = answer.get("reason")
        if reason is None:
            reason = "approved by the webhook" if approved else "denied by the webhook"
        if not isinstance(reason, str):
            raise WebhookError('the response\'s "reason" is not a string')
        remember = answer.get("remember", True)
        if not isinstance(remember, bool):
            raise WebhookError('the response\'s "remember" is not true or false')
        return Decision(approved, reason[:MAX_REASON_LENGTH], self.name, remember)
