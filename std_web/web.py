"""WebService: std_web's lifecycle under core_buffer.service.run (the one run loop of every daemon).

uvicorn serves the app in a thread of its own, on a socket bound here at build time, so a port in use is
a start-up error (exit 1 with the reason) rather than a thread that dies later. The run loop's poll only
watches that thread; stop() asks uvicorn to exit (open WebSockets get a close frame), then stops the
pipeline view's threads. Shutdown order: stop taking HTTP requests, let running ones finish (at most
SHUTDOWN_GRACE_S), then stop the broker link, the metrics poller and the live view, then join them.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Mapping

import uvicorn

from core_buffer.config import DetectorConfig
from core_buffer.errors import StdDaqError
from std_web.api import WebApp
from std_web.config import WebSettings
from std_web.pipeline import PipelineView

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 3
BACKLOG = 128


class WebService:
    name = "std_web"
    rate_counters = ("http_requests", "status_pushes")

    def __init__(self, config: DetectorConfig, settings: WebSettings, broker_url: str | None = None) -> None:
        self.config = config
        self.settings = settings
        self.sock = _listen(settings.host, settings.port)
        try:
            self.view = PipelineView(config, settings.metrics_interval_s, broker_url)
            self.web = WebApp(config, settings, self.view)
            server_config = uvicorn.Config(self.web.app, log_level="warning", access_log=False, lifespan="off",
                                           ws="websockets-sansio", timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                                           ws_max_size=64 << 10)
            self.server = uvicorn.Server(server_config)
        except BaseException:
            self.sock.close()
            raise
        self.view.start()
        self.thread = threading.Thread(target=self._serve, name="std_web-http", daemon=True)
        self.thread.start()
        host, port = self.sock.getsockname()[:2]
        log.info("std_web: serving detector %s on http://%s:%d/ (token %s, CORS %s)", config.detector_name,
                 host, port, "required for writes" if settings.token else "not set",
                 ", ".join(settings.cors_origins) or "off")

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except Exception:  # noqa: BLE001 - logged; poll() sees the thread gone and says so
            log.exception("std_web: the HTTP server stopped")

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def poll(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if not self.thread.is_alive() and not self.server.should_exit:
            raise StdDaqError("the HTTP server thread ended")  # the run loop logs it; no busy loop

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(SHUTDOWN_GRACE_S + 5)
        self.view.stop()
        self.view.join()

    def close(self) -> None:
        self.sock.close()

    def stats(self) -> Mapping[str, int]:
        return self.web.stats()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock
