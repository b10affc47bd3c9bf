"""Fixtures of the std_web tests: a whole pipeline with std_web started by the launcher (the e2e fixtures),
or std_web alone as a process of its own; an HTTP client that answers JSON."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from std_daq.launcher import console_script
from tests.conftest import free_tcp_port_block
from tests.e2e.conftest import pipeline_config, pipelines  # noqa: F401 - fixtures used by these tests

READY_TIMEOUT_S = 30.0


class Http:
    """urllib against one base URL; every answer as (HTTP status, headers, body)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None, timeout_s: float = 30.0) -> tuple[int, Any, bytes]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers, exc.read()

    def json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        status, _, payload = self.request(method, path, body, **kwargs)
        return status, json.loads(payload)

    def get(self, path: str) -> dict[str, Any]:
        status, answer = self.json("GET", path)
        assert status == 200, (path, status, answer)
        return answer

    def post(self, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        status, answer = self.json("POST", path, body if body is not None else {}, **kwargs)
        assert status == 200, (path, status, answer)
        return answer


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last: {last!r})")


class WebPipeline:
    """A pipeline of real services (std_web among them, started by the launcher), its HTTP client, and the
    directory its files go to."""

    def __init__(self, pipe: Any, http: Http, out: Path) -> None:
        self.pipe, self.http, self.out = pipe, http, out


@pytest.fixture
def web_pipeline(pipeline_config: Any, pipelines: Any, tmp_path: Path) -> Any:  # noqa: F811
    """make a pipeline with a live preview and std_web; keyword arguments go into the `web` section."""

    def factory(**web: Any) -> WebPipeline:
        live_port, web_port = free_tcp_port_block(2), None
        web_port = live_port + 1
        path, config = pipeline_config(stream_send={"live": f"tcp://127.0.0.1:{live_port}", "live_rate_hz": 20},
                                       web={"host": "127.0.0.1", "port": web_port, **web})
        pipe = pipelines(path, config)
        return WebPipeline(pipe, Http(f"http://127.0.0.1:{web_port}"), tmp_path / "out")

    return factory


class WebProcess:
    """std_web alone, as the console script, with its log in a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([console_script("std_web"), str(config_path)], stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})})
        self.http = Http(f"http://127.0.0.1:{port}")

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"std_web exited with {self.process.returncode}:\n{self.log()}")
            try:
                return self.http.request("GET", "/metrics", timeout_s=1)[0] == 200
            except OSError:
                return False

        wait_for(answers, READY_TIMEOUT_S, "std_web answering")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self._log.closed:
            return self.process.returncode
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@pytest.fixture
def web_alone(make_config: Any, tmp_path: Path) -> Iterator[Any]:
    """std_web without a pipeline (its broker link finds no writer_agent); stopped at the end."""
    started: list[WebProcess] = []

    def factory(env: dict[str, str] | None = None, **web: Any) -> WebProcess:
        port = free_tcp_port_block(1)
        web.setdefault("port", port)
        path, _ = make_config(ipc_dir=str(tmp_path), web=web)
        proc = WebProcess(path, web["port"], tmp_path / f"std_web-{len(started)}.log", env)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield factory
    for proc in started:
        proc.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Note on the test item whether its call failed (the browser fixture keeps a screenshot then)."""
    outcome = yield
    if call.when == "call":
        item.failed_call = outcome.get_result().failed
