"""The RabbitMQ side of std-daq (DESIGN.md §5): where the broker is, the exchanges, the status message.

The broker URL comes from the environment, never from code or config files that get copied around:
`STD_DAQ_BROKER_URL`, or `STD_DAQ_BROKER_URL_FILE` naming a file that holds it (for systemd credentials
or Docker secrets). The default, `amqp://guest:guest@127.0.0.1:5672/%2F`, is RabbitMQ's local-only guest
account. Logs show a URL only through `describe_url`, which masks the password.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

import pika

from core_buffer.errors import StdDaqError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
URL_ENV = "STD_DAQ_BROKER_URL"
URL_FILE_ENV = "STD_DAQ_BROKER_URL_FILE"

REQUEST_EXCHANGE = "request"  # topic: write requests, routing key = the service's tag
STATUS_EXCHANGE = "status"  # fanout: every status of every request
KILL_EXCHANGE = "kill"  # topic: empty body, correlation_id = the request to stop
EXCHANGES = ((REQUEST_EXCHANGE, "topic"), (STATUS_EXCHANGE, "fanout"), (KILL_EXCHANGE, "topic"))

REQUEST_START = "request_start"
REQUEST_PROGRESS = "request_progress"
REQUEST_SUCCESS = "request_success"
REQUEST_FAIL = "request_fail"
FINAL_ACTIONS = (REQUEST_SUCCESS, REQUEST_FAIL)

# This project's extension (docs/writer_agent.md, "Kill and the request listing"): every kill is answered;
# a kill names a full request id, a unique prefix of one, or the running write; a query on the request
# exchange, marked by an AMQP header, is answered with the running and the queued requests.
KILL_ACCEPTED = "kill_accepted"  # message: the full id of the request it stops
KILL_REFUSED = "kill_refused"  # message: why
KILL_ANSWERS = (KILL_ACCEPTED, KILL_REFUSED)
KILL_CURRENT = "current"  # a kill's correlation_id that names the write running now
KILL_PREFIX_MIN = 4  # the shortest request id prefix a kill may name
REQUEST_LIST = "request_list"  # message: a JSON array of the running, then the queued requests
QUERY_HEADER = "query"  # AMQP header that marks a message on the request exchange as a query, not a write
QUERY_REQUESTS = "requests"  # the one query: the running and the queued requests


class BrokerConfigError(StdDaqError):
    pass


def broker_url(environ: Mapping[str, str] | None = None) -> str:
    """The AMQP URL to use: $STD_DAQ_BROKER_URL, else the contents of $STD_DAQ_BROKER_URL_FILE, else the
    local guest default."""
    env = os.environ if environ is None else environ
    if env.get(URL_ENV):
        return env[URL_ENV].strip()
    if env.get(URL_FILE_ENV):
        path = env[URL_FILE_ENV]
        try:
            with open(path, encoding="utf-8") as f:
                url = f.read().strip()
        except OSError as exc:
            raise BrokerConfigError(f"{URL_FILE_ENV}={path}: cannot read it ({exc.strerror})") from None
        if not url:
            raise BrokerConfigError(f"{URL_FILE_ENV}={path}: the file is empty")
        return url
    return DEFAULT_URL


def describe_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and messages.

    Works on the text, not on a URL parser, and never raises: a password may hold an unescaped '/', '#',
    '?' or '@' (a parser then cuts the URL at the wrong place and shows the rest of the password as host or
    path) and a mistyped port may be out of range (urlsplit raises). Everything between '://' and the last
    '@' is the credentials; of them only the user name, up to the first ':', is shown (credentials without a
    ':' may be a token, and are hidden whole). A '@' later in the path hides more than needed, never less."""
    scheme_end = url.find("://")
    start = 0 if scheme_end < 0 else scheme_end + 3
    at = url.rfind("@", start)
    if at < 0:
        return url
    user, colon, _ = url[start:at].partition(":")
    return url[:start] + (f"{user}:***" if colon else "***") + url[at:]


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts TCP connections at the broker's host and port (no AMQP handshake); False
    also for a URL whose host or port cannot be read."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        return False
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def connect(url: str, *, connection_name: str, heartbeat_s: int = 30,
            timeout_s: float = 5.0) -> pika.BlockingConnection:
    """A blocking connection that fails fast (one attempt) so the caller's loop decides about retries."""
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat_s
    params.connection_attempts = 1
    params.socket_timeout = timeout_s
    params.stack_timeout = timeout_s + 1
    params.blocked_connection_timeout = 30
    params.client_properties = {"connection_name": connection_name}
    return pika.BlockingConnection(params)


def declare_exchanges(channel: Any) -> None:
    for name, kind in EXCHANGES:
        channel.exchange_declare(exchange=name, exchange_type=kind)


@dataclass(frozen=True)
class StatusMessage:
    """One status of one request as published on the `status` exchange."""

    request_id: str
    action: str
    source: str
    message: str
    body: bytes

    def properties(self) -> pika.BasicProperties:
        return pika.BasicProperties(correlation_id=self.request_id, content_type="application/json",
                                    headers={"action": self.action, "source": self.source,
                                             "message": self.message})

    @classmethod
    def from_delivery(cls, properties: pika.BasicProperties, body: bytes) -> StatusMessage:
        headers = properties.headers or {}

        def text(value: Any) -> str:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")

        return cls(properties.correlation_id or "", text(headers.get("action")), text(headers.get("source")),
                   text(headers.get("message")), body)
