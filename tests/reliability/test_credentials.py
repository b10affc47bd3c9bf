"""Broker credentials come from the environment or a file and never show up in logs, statistics or
statuses, also when the login fails. Uses a RabbitMQ account made for the test (rabbitmqctl)."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid

import pytest

from core_buffer import broker
from std_daq.launcher import console_script
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.broker


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def account(broker_url):
    """(user, password) of a fresh RabbitMQ account with full rights on the default vhost."""
    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl is not installed (the broker runs elsewhere)")
    user, password = f"stddaq-{uuid.uuid4().hex[:8]}", "pw-" + secrets.token_hex(12)
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    yield user, password
    rabbitmqctl("delete_user", user)


def start_agent(config_path, env: dict[str, str], log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([console_script("writer_agent"), str(config_path), "--stats-interval", "0.2"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})


def wait_for_text(log_path, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text():
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_the_password_from_a_file_never_reaches_logs_or_statuses(account, make_config, tmp_path):
    from std_daq.client import DaqClient

    user, password = account
    url = f"amqp://{user}:{password}@127.0.0.1:5672/%2F"
    url_file = tmp_path / "broker-url"
    url_file.write_text(url + "\n")
    url_file.chmod(0o600)
    out = tmp_path / "out"
    out.mkdir()
    path, config = make_config(output_dirs=[str(out)], writer_agent={"writer_timeout_s": 0.5})
    log_path = tmp_path / "agent.log"
    # No std_h5_writer runs: the request fails after writer_timeout_s, so the agent logs, publishes
    # request_start and request_fail, and prints statistics meanwhile.
    agent = start_agent(path, {broker.URL_FILE_ENV: str(url_file), broker.URL_ENV: ""}, log_path)
    client = DaqClient(url)
    try:
        wait_for_text(log_path, "serving tag")
        request_id = client.submit(str(out / "a.h5"), 3, tag=config.detector_name)
        result = client.wait(request_id, timeout_s=30)
    finally:
        client.close()
        stop(agent)
    assert not result.ok and "std_h5_writer" in result.message
    log = log_path.read_text()
    assert f"{user}:***@" in log  # the URL is shown, with the password masked
    assert password not in log
    for status in result.statuses:
        assert password not in status.message and password.encode() not in status.body


def test_a_failed_login_does_not_print_the_password(account, make_config, tmp_path):
    user, password = account
    wrong = password + "-wrong"
    path, _ = make_config(output_dirs=[str(tmp_path)])
    log_path = tmp_path / "agent.log"
    agent = start_agent(path, {broker.URL_ENV: f"amqp://{user}:{wrong}@127.0.0.1:5672/%2F"}, log_path)
    try:
        wait_for_text(log_path, "ACCESS_REFUSED")  # the broker said no, and the agent said so
    finally:
        stop(agent)
    log = log_path.read_text()
    assert wrong not in log and password not in log
    cli = subprocess.run([console_script("std-daq"), "write", str(tmp_path / "x.h5"), "1", "--tag", "nobody"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, broker.URL_ENV: f"amqp://{user}:{wrong}@127.0.0.1:5672/%2F"})
    assert cli.returncode != 0
    assert wrong not in cli.stdout + cli.stderr
