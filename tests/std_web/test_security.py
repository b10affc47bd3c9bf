"""std_web's defences, against the real service process: loopback only unless configured, a bearer token
for writes, stops and config changes (never logged), size-limited bodies, no CORS unless configured."""
from __future__ import annotations

import http.client
import json

import psutil
import pytest

pytestmark = pytest.mark.broker

TOKEN = "s3cret-t0ken-for-the-test"
WRITE = {"output_file": "/tmp/never-written.h5", "n_images": 1}


def test_it_listens_on_loopback_only_by_default(web_alone):
    web = web_alone()
    listening = [c for c in psutil.Process(web.process.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]


def test_writes_stops_and_config_changes_need_the_token_and_it_is_never_logged(web_alone, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    web = web_alone(token_file=str(token_file))

    for path in ("/writer/write_sync", "/writer/write_async", "/writer/stop", "/daq/config", "/simulation/start"):
        status, answer = web.http.json("POST", path, WRITE)
        assert status == 401 and answer["status"] == "error" and "token" in answer["message"], (path, answer)
        status, answer = web.http.json("POST", path, WRITE, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and "wrong" in answer["message"], (path, answer)
    # With the token the request gets past the check: no writer_agent serves this detector's tag.
    status, answer = web.http.json("POST", "/writer/write_async", WRITE, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and answer["status"] == "error" and "no writer_agent serves tag" in answer["message"]
    # Reading needs no token.
    assert web.http.get("/writer/status")["status"] == "ok"
    assert web.http.get("/daq/config")["config"]["web"]["token_file"] == str(token_file)
    metrics = web.http.request("GET", "/metrics")[2].decode()
    assert "std_daq_std_web_auth_refusals" in metrics
    assert web.stop() == 0
    assert TOKEN not in web.log()


def test_the_token_from_the_environment_wins_over_the_file(web_alone, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file")
    web = web_alone(env={"STD_WEB_TOKEN": TOKEN}, token_file=str(token_file))
    assert web.http.json("POST", "/writer/stop", {}, headers={"Authorization": "Bearer from-the-file"})[0] == 401
    assert web.http.json("POST", "/writer/stop", {}, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(web_alone):
    web = web_alone(max_body_bytes=1024)
    big = {**WRITE, "note": "x" * 2000}
    status, answer = web.http.json("POST", "/writer/write_async", big)
    assert status == 413 and "1024 bytes" in answer["message"]
    # Without a Content-Length: a chunked body is counted as it arrives.
    host, port = web.http.base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/writer/write_async")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    payload = json.dumps(big).encode()
    for start in range(0, len(payload), 500):
        piece = payload[start:start + 500]
        connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["status"] == "error"
    connection.close()
    # A body under the limit is read (and refused by the broker side: no agent).
    status, answer = web.http.json("POST", "/writer/write_async", {**WRITE, "note": "small"})
    assert status == 200 and "no writer_agent" in answer["message"]


def test_no_cors_headers_unless_origins_are_configured(web_alone):
    origin = "http://control.example:8080"
    closed = web_alone()
    _, headers, _ = closed.http.request("GET", "/writer/status", headers={"Origin": origin})
    assert headers.get("Access-Control-Allow-Origin") is None
    status, headers, _ = closed.http.request("OPTIONS", "/writer/write_async", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert headers.get("Access-Control-Allow-Origin") is None
    assert closed.stop() == 0  # one std_web per detector: the role lock

    opened = web_alone(cors_origins=[origin])
    _, headers, _ = opened.http.request("GET", "/writer/status", headers={"Origin": origin})
    assert headers.get("Access-Control-Allow-Origin") == origin
    _, headers, _ = opened.http.request("GET", "/writer/status", headers={"Origin": "http://elsewhere"})
    assert headers.get("Access-Control-Allow-Origin") is None


def test_a_second_std_web_of_the_detector_is_refused_naming_the_first(web_alone, tmp_path):
    first = web_alone()
    from tests.std_web.conftest import WebProcess
    from tests.conftest import free_tcp_port_block

    config_path = next(tmp_path.glob("*.json"))
    second = WebProcess(config_path, free_tcp_port_block(1), tmp_path / "second.log")
    assert second.process.wait(timeout=30) == 1
    second.stop()
    assert f"pid {first.process.pid}" in second.log() and "web role" in second.log()
