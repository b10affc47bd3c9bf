"""The HTTP side of std_web: the REST API (compatible with the 2023 std-daq REST interface), the pushed
status (WebSocket /ws), the page and its two files, and std_web's own Prometheus metrics.

Answers: HTTP 200 with `{"status": "ok" | "error", "message": ..., ...}` for a success and for a refusal,
as the 2023 interface answers; 422 for a malformed body (the message names the field), 401 for a missing
or wrong token, 413 for a body over `web.max_body_bytes` (all with the same JSON shape).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from core_buffer.config import DetectorConfig
from std_daq import status as daq_status
from std_web.config import WebSettings
from std_web.pipeline import CommandFailed, PipelineView, WriteRecord
from std_web.png import encode_grey, to_png_samples

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ASYNC_VERDICT_S = 2.0  # write_async waits this long at most for the agent's verdict on a request it took
LOGS_MAX = 1000
LIVE_SIDE_MAX = 4096
MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1
OPENAPI_PATH = "/openapi.json"


class WriteRequestBody(BaseModel):
    """A write request: the 2023 interface's keys, plus any others, which travel to the file's request
    attribute as writer_agent keeps them."""

    model_config = ConfigDict(extra="allow")

    output_file: str = Field(min_length=1, max_length=4096, description="absolute path of the HDF5 file")
    n_images: int = Field(ge=1, le=MAX_U32, strict=True, description="images to write")
    run_id: int | None = Field(None, ge=0, le=MAX_U64, strict=True, description="default: from the time")
    user_id: int | None = Field(None, ge=0, le=MAX_U32, strict=True, description="0: the writer's own user")


def ok(message: str = "", **payload: Any) -> dict[str, Any]:
    return {"status": "ok", "message": message, **payload}


def error(message: str, **payload: Any) -> dict[str, Any]:
    return {"status": "error", "message": message, **payload}


class BodyLimit:
    """Refuse (413) request bodies over `limit` bytes before the app reads them: by Content-Length when
    given, else by counting a chunked body as it arrives (it is held here, at most `limit` bytes, and
    replayed to the app)."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                await self._refuse(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Callable) -> None:
        payload = json.dumps(error(f"the request body is larger than {self.limit} bytes (web.max_body_bytes)"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload.encode()})


class WebApp:
    """Builds the FastAPI app of one detector's pipeline view."""

    def __init__(self, config: DetectorConfig, settings: WebSettings, view: PipelineView) -> None:
        self.config = config
        self.settings = settings
        self.view = view
        self.ws_clients = 0
        self.status_pushes = 0
        self.http_requests = 0
        self.auth_refusals = 0
        self._snapshot_lock = threading.Lock()
        self._snapshot: tuple[int, float, dict[str, Any]] | None = None
        self.version = _package_version()
        self.app = self._build()

    # -- the app ----------------------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title=f"std-daq web: {self.config.detector_name}", version=self.version,
                      description="REST API of one std-daq detector pipeline (2023 std-daq REST interface).",
                      docs_url=None, redoc_url=None,  # both load their pages from a CDN: none on a beamline
                      openapi_url=OPENAPI_PATH)
        if self.settings.cors_origins:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=list(self.settings.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        app.add_middleware(BodyLimit, limit=self.settings.max_body_bytes)

        @app.middleware("http")
        async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            self.http_requests += 1
            return await call_next(request)

        app.add_exception_handler(RequestValidationError, self._invalid)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        self._routes(app)
        return app

    async def _invalid(self, _request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
            problems.append({"field": where, "problem": str(item.get("msg", "invalid"))})
        text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems) or "malformed request"
        return JSONResponse(error(f"invalid request: {text}", errors=problems), status_code=422)

    async def _http_error(self, _request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    def _require_token(self, request: Request) -> None:
        """Writes, stops and config changes need `Authorization: Bearer <token>` when a token is set."""
        token = self.settings.token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            self.auth_refusals += 1
            raise StarletteHTTPException(401, "this needs the bearer token (Authorization: Bearer ...): "
                                              + ("none was given" if not given else "the one given is wrong"),
                                         headers={"WWW-Authenticate": "Bearer"})

    def _routes(self, app: FastAPI) -> None:
        authorised = [Depends(self._require_token)]

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                                headers={"Cache-Control": "no-cache"})

        @app.get("/static/{name}", include_in_schema=False)
        def static(name: Literal["app.js", "style.css"]) -> FileResponse:
            kind = "text/javascript" if name.endswith(".js") else "text/css"
            return FileResponse(STATIC_DIR / name, media_type=kind, headers={"Cache-Control": "no-cache"})

        @app.post("/writer/write_sync", dependencies=authorised, tags=["writer"])
        def write_sync(body: WriteRequestBody) -> dict[str, Any]:
            """Write `n_images` to `output_file` and answer when the write has ended (at most
            web.write_timeout_s)."""
            record, refusal = self._submit(body)
            if refusal is not None:
                return refusal
            if not record.done.wait(self.settings.write_timeout_s):
                return error(f"the write {record.request_id} did not end within {self.settings.write_timeout_s:g} s "
                             "(web.write_timeout_s); it goes on: POST /writer/stop stops it",
                             request_id=record.request_id, acquisition=record.acquisition())
            return self._verdict(record)

        @app.post("/writer/write_async", dependencies=authorised, tags=["writer"])
        def write_async(body: WriteRequestBody) -> dict[str, Any]:
            """Start a write and answer at once (after the agent's check of the request);
            GET /writer/status follows it."""
            record, refusal = self._submit(body)
            if refusal is not None:
                return refusal
            deadline = time.monotonic() + ASYNC_VERDICT_S
            with record.news:
                while record.active and not record.progressed and time.monotonic() < deadline:
                    record.news.wait(max(0.0, deadline - time.monotonic()))
            if not record.active and record.state == "FAILED":
                return self._verdict(record)
            return ok("Writing started." if record.progressed or not record.active else
                      "Request taken; waiting for its turn or the writer.",
                      request_id=record.request_id, acquisition=record.acquisition())

        @app.get("/writer/status", tags=["writer"])
        def writer_status() -> dict[str, Any]:
            """The writer's state (READY, WRITING, UNKNOWN) and the last write's acquisition."""
            return ok("", writer=self.view.writer_status())

        @app.post("/writer/stop", dependencies=authorised, tags=["writer"])
        def writer_stop() -> dict[str, Any]:
            """Stop the running write (a kill of `current` over RabbitMQ); resets UNKNOWN to READY."""
            try:
                accepted, request_id, message = self.view.kill_current()
            except CommandFailed as exc:
                return error(f"cannot stop: {exc}")
            if accepted:
                return ok(f"stopping the write {request_id}", request_id=request_id)
            return ok(f"nothing to stop: {message}")

        @app.get("/daq/config", tags=["daq"])
        def daq_config() -> dict[str, Any]:
            """The detector config file's keys."""
            try:
                with open(self.config.source, encoding="utf-8") as f:
                    raw = json.load(f)
            except (OSError, ValueError) as exc:
                return error(f"cannot read the config file {self.config.source}: {exc}")
            return ok("", config=raw)

        @app.post("/daq/config", dependencies=authorised, tags=["daq"])
        def daq_config_write(_body: dict[str, Any]) -> dict[str, Any]:
            """Change the detector config: refused unless web.allow_config_write (and not built yet)."""
            if not self.settings.allow_config_write:
                return error("config changes over HTTP are off: set web.allow_config_write to true to allow them")
            return error("config changes over HTTP are not implemented in this version of std_web")

        @app.get("/daq/stats", tags=["daq"])
        def daq_stats() -> dict[str, Any]:
            """Rates and losses from the services' Prometheus metrics."""
            return ok("", stats=self.view.metrics.stats(self.config.image_bytes))

        @app.get("/daq/logs/{n}", tags=["daq"])
        def daq_logs(n: int = PathParam(ge=0, le=LOGS_MAX)) -> dict[str, Any]:
            """The last `n` write requests (newest first) and how they ended."""
            return ok("", logs=self.view.book.logs(n))

        @app.get("/daq/deployment", tags=["daq"])
        def daq_deployment() -> dict[str, Any]:
            """Which services run: answering on their metrics endpoints, and their processes."""
            return ok("", deployment=self._deployment())

        @app.get("/daq/live", tags=["daq"], response_model=None,
                 responses={200: {"content": {"image/png": {}}, "description": "the latest live image"}})
        def daq_live(scale: Literal["raw", "auto"] = "raw") -> Response | dict[str, Any]:
            """The latest live-preview image as a greyscale PNG: `raw` keeps the pixel values (16 bits),
            `auto` stretches the image's range to 8 bits."""
            image = self.view.live.latest if self.view.live is not None else None
            if image is None:
                return error(self._no_live_reason())
            return Response(encode_grey(to_png_samples(image.pixels, scale)), media_type="image/png",
                            headers=self._live_headers(image, image.pixels.shape))

        @app.get("/daq/live/raw", tags=["daq"], response_model=None,
                 responses={200: {"content": {"application/octet-stream": {}},
                                  "description": "little-endian pixel values, row by row"}})
        def daq_live_raw(max_side: int = Query(1024, ge=1, le=LIVE_SIDE_MAX)) -> Response | dict[str, Any]:
            """The latest live image's raw values, reduced by the maximum of square blocks until neither side
            exceeds `max_side`; X-Shape, X-Dtype, X-Image-Id describe it (what the page draws)."""
            image = self.view.live.latest if self.view.live is not None else None
            if image is None:
                return error(self._no_live_reason())
            pixels = _reduce(image.pixels, max_side)
            return Response(pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes(),
                            media_type="application/octet-stream", headers=self._live_headers(image, pixels.shape))

        @app.get("/simulation/status", tags=["simulation"])
        def simulation_status() -> dict[str, Any]:
            """The detector simulator: refused unless web.allow_simulation (not built yet)."""
            return self._simulation_refusal()

        @app.post("/simulation/start", dependencies=authorised, tags=["simulation"])
        def simulation_start() -> dict[str, Any]:
            return self._simulation_refusal()

        @app.post("/simulation/stop", dependencies=authorised, tags=["simulation"])
        def simulation_stop() -> dict[str, Any]:
            return self._simulation_refusal()

        @app.get("/metrics", include_in_schema=False)
        def metrics() -> PlainTextResponse:
            return PlainTextResponse(self._prometheus_text(), media_type="text/plain; version=0.0.4")

        @app.websocket("/ws")
        async def pushed_status(websocket: WebSocket) -> None:
            """The status snapshot, pushed whenever something changed, at most web.status_rate_hz times a
            second."""
            await websocket.accept()
            self.ws_clients += 1
            period = 1.0 / self.settings.status_rate_hz
            sent_version = -1
            try:
                while True:
                    version = self.view.version
                    if version != sent_version:
                        sent_version = version
                        await websocket.send_text(self.snapshot_text())
                        self.status_pushes += 1
                    await asyncio.sleep(period)
            except (WebSocketDisconnect, RuntimeError, ConnectionError):
                pass  # the page went away (RuntimeError: starlette's "send after close")
            finally:
                self.ws_clients -= 1

    # -- helpers ----------------------------------------------------------------------------------------
    def _submit(self, body: WriteRequestBody) -> tuple[WriteRecord | None, dict[str, Any] | None]:
        request = body.model_dump(exclude_none=True)
        try:
            return self.view.submit(request), None
        except CommandFailed as exc:
            return None, error(f"the write was not sent: {exc}")

    def _verdict(self, record: WriteRecord) -> dict[str, Any]:
        payload = {"request_id": record.request_id, "acquisition": record.acquisition()}
        if record.final_action == "request_success":
            return ok(record.message, **payload)
        if record.message == "Interrupted.":
            return error(f"Interrupted. {record.final_message}", **payload)
        return error(record.final_message or record.message, **payload)

    def _no_live_reason(self) -> str:
        if self.view.live is None:
            return ("no live preview in this config: std_stream_send serves it when the config has "
                    "stream_send.live")
        return f"no live image received yet from {self.view.live.address}"

    def _live_headers(self, image: Any, shape: tuple[int, ...]) -> dict[str, str]:
        return {"X-Image-Id": str(image.image_id), "X-Frame": str(image.frame), "X-Status": str(image.status),
                "X-Shape": f"{shape[0]},{shape[1]}", "X-Dtype": str(image.dtype),
                "X-Full-Shape": f"{image.pixels.shape[0]},{image.pixels.shape[1]}", "Cache-Control": "no-store"}

    def _simulation_refusal(self) -> dict[str, Any]:
        if not self.settings.allow_simulation:
            return error("the simulation endpoints are off: set web.allow_simulation to true to allow them")
        return error("the simulation endpoints are not implemented in this version of std_web; run std_udp_sim")

    def _deployment(self) -> dict[str, Any]:
        processes = daq_status.detector_processes(self.config)
        by_label: dict[str, list[int]] = {}
        for process in processes:
            label = f"std_{process.role}" if process.service == "std_udp_recv" else process.service
            by_label.setdefault(label, []).append(process.pid)
        services = []
        for metrics in self.view.metrics.current:
            services.append({"service": metrics.label, "up": metrics.values is not None,
                             "pids": sorted(by_label.get(metrics.label, [])), "restarts": None,
                             "metrics_url": metrics.url})
        services.append({"service": daq_status.WEB_LABEL, "up": True, "pids": [os.getpid()], "restarts": None,
                         "metrics_url": None})
        launcher = daq_status.launcher_of(self.config)
        return {"detector_name": self.config.detector_name, "version": self.version, "services": services,
                "launcher": launcher.describe() if launcher is not None else None}

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as one JSON-ready dict (what /ws pushes)."""
        view = self.view
        image = view.live.latest if view.live is not None else None
        live = None if image is None else {
            "image_id": image.image_id, "frame": image.frame, "status": image.status,
            "is_good_frame": image.is_good_frame, "shape": list(image.pixels.shape), "dtype": image.dtype,
            "received_at": image.received_at}
        return {"type": "status", "time": time.time(), "detector_name": self.config.detector_name,
                "writer": view.writer_status(), "services": view.metrics.services(),
                "stats": view.metrics.stats(self.config.image_bytes), "live": live,
                "live_reason": None if image is not None else self._no_live_reason(),
                "logs": view.book.logs(10),
                "broker": {"connected": view.broker.connected.is_set(), "error": view.broker.error}}

    def snapshot_text(self) -> str:
        """The snapshot as JSON, made once per change of the view however many pages are open."""
        version = self.view.version
        with self._snapshot_lock:
            if self._snapshot is None or self._snapshot[0] != version:
                self._snapshot = (version, time.monotonic(), self.snapshot())
                self._snapshot_text = json.dumps(self._snapshot[2], default=_json_default)
            return self._snapshot_text

    def stats(self) -> dict[str, int]:
        return {**self.view.stats(), "http_requests": self.http_requests, "ws_clients": self.ws_clients,
                "status_pushes": self.status_pushes, "auth_refusals": self.auth_refusals}

    def _prometheus_text(self) -> str:
        labels = f'detector="{self.config.detector_name}"'
        lines = []
        for name, value in self.stats().items():
            metric = f"std_daq_{daq_status.WEB_LABEL}_{name}"
            lines += [f"# TYPE {metric} untyped", f"{metric}{{{labels}}} {float(value)}"]
        return "\n".join(lines) + "\n"


def _reduce(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """The image shrunk by an integer factor, each pixel the maximum of its block (a hot pixel or a Bragg
    peak stays visible, as it would not if every n-th pixel were taken)."""
    factor = max(1, math.ceil(max(pixels.shape) / max_side))
    if factor == 1:
        return pixels
    rows, cols = pixels.shape[0] // factor, pixels.shape[1] // factor
    if rows == 0 or cols == 0:
        return pixels[::factor, ::factor]
    blocks = pixels[:rows * factor, :cols * factor].reshape(rows, factor, cols, factor)
    return blocks.max(axis=(1, 3))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def _package_version() -> str:
    try:
        return metadata.version("std-daq")
    except metadata.PackageNotFoundError:
        return "unknown"
