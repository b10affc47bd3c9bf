"""The `web` config section, validated into a frozen WebSettings.

| key | default | meaning |
|---|---|---|
| host | 127.0.0.1 | interface to listen on (only loopback unless the config says otherwise) |
| port | 5000 | TCP port (the 2023 std-daq REST interface's) |
| write_timeout_s | 600 | POST /writer/write_sync waits at most this long for the write to end |
| token_file | none | file holding the bearer token that writes, stops and config changes need |
| max_body_bytes | 65536 | larger request bodies are refused (413) before they are read further |
| cors_origins | [] | origins allowed by CORS; none: no CORS headers at all |
| allow_config_write | false | POST /daq/config (not built yet: refused either way) |
| allow_simulation | false | the /simulation endpoints (not built yet: refused either way) |
| status_rate_hz | 10 | pushed status messages per second at most (WebSocket /ws) |
| metrics_interval_s | 1.0 | how often the services' Prometheus endpoints are scraped |

The token may also come from the environment, `$STD_WEB_TOKEN`, which wins over `token_file`. It is
never logged, never shown by an endpoint, and compared in constant time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError

TOKEN_ENV = "STD_WEB_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WRITE_TIMEOUT_S = 600.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_STATUS_RATE_HZ = 10.0
DEFAULT_METRICS_INTERVAL_S = 1.0
TOKEN_MAX_BYTES = 4096


@dataclass(frozen=True)
class WebSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S
    token: str | None = field(default=None, repr=False)  # never in a repr, so never in a log line
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cors_origins: tuple[str, ...] = ()
    allow_config_write: bool = False
    allow_simulation: bool = False
    status_rate_hz: float = DEFAULT_STATUS_RATE_HZ
    metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S

    @classmethod
    def from_config(cls, config: DetectorConfig, environ: dict[str, str] | None = None) -> WebSettings:
        environ = os.environ if environ is None else environ
        section = config.section("web")
        host = section.str("host", DEFAULT_HOST, expected="an interface address such as 127.0.0.1")
        port = section.int("port", DEFAULT_PORT, min=1, max=65535)
        write_timeout_s = section.float("write_timeout_s", DEFAULT_WRITE_TIMEOUT_S, min=0.1)
        token_file = section.path("token_file", None)
        max_body_bytes = section.int("max_body_bytes", DEFAULT_MAX_BODY_BYTES, min=256, max=64 << 20)
        cors_origins = section.str_list("cors_origins", ())
        allow_config_write = section.bool("allow_config_write", False)
        allow_simulation = section.bool("allow_simulation", False)
        status_rate_hz = section.float("status_rate_hz", DEFAULT_STATUS_RATE_HZ, min=0.1, max=10.0)
        metrics_interval_s = section.float("metrics_interval_s", DEFAULT_METRICS_INTERVAL_S, min=0.1)
        section.finish()
        if not host:
            raise section.error("host", host, "an interface address such as 127.0.0.1")
        token = environ.get(TOKEN_ENV) or None
        if token is None and token_file is not None:
            token = _read_token(token_file, config.source)
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() for c in token):
                raise ConfigError("web.token_file" if not environ.get(TOKEN_ENV) else f"${TOKEN_ENV}",
                                  "<hidden>", "a token of visible characters without spaces", config.source)
        return cls(host, port, write_timeout_s, token, max_body_bytes, cors_origins, allow_config_write,
                   allow_simulation, status_rate_hz, metrics_interval_s)


def _read_token(path: str, source: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(TOKEN_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError("web.token_file", path, f"a readable file ({exc.strerror})", source) from None
    if len(raw) > TOKEN_MAX_BYTES:
        raise ConfigError("web.token_file", path, f"a file of at most {TOKEN_MAX_BYTES} bytes", source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("web.token_file", path, "a UTF-8 text file", source) from None
