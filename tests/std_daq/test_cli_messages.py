"""What the command line says when something is wrong, and its help: each message points the way to the
fix (issue 21). Through the installed console scripts, against the real RabbitMQ where one is needed; the
monitor's line logic as a unit, on status messages built here."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from core_buffer import broker
from core_buffer.broker import StatusMessage
from std_daq import cli
from std_daq.launcher import console_script
from std_daq.requests_cli import MonitorTable
from std_udp_recv import sim_cli
from tests.conftest import free_tcp_port_block


def run(script: str, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("STD_DAQ_TAG", None)
    if url is not None:
        env[broker.URL_ENV] = url
    return subprocess.run([console_script(script), *args], capture_output=True, text=True, env=env, timeout=60)


# -- write and kill refuse what they can tell is wrong, before sending ---------------------------------

@pytest.mark.broker
@pytest.mark.parametrize("args,refusal", [
    (("/tmp/x.h5", "0"), "argument n_images: must be 1 or more, got 0"),
    (("/tmp/x.h5", "-5"), "argument n_images: must be 1 or more, got -5"),
    (("/tmp/x.h5", "5", "--run-id", "-1"), "argument --run-id: must be 0 or more, got -1"),
    (("/tmp/x.h5", "5", "--user-id", "-1"), "argument --user-id: must be 0 or more, got -1"),
    (("/tmp/", "5"), "/tmp/ ends in '/': it names a directory"),
])
def test_write_refuses_what_it_can_tell_is_wrong_without_sending_it(broker_url, detector_name, args, refusal):
    # Nobody serves the tag: a request that went out would come back "no writer_agent serves tag" (exit 1).
    result = run("std-daq", "write", *args, "--tag", detector_name, "--wait", url=broker_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert refusal in result.stderr
    assert "no writer_agent serves" not in result.stderr and "request " not in result.stdout


@pytest.mark.broker
def test_kill_refuses_a_prefix_shorter_than_4_characters(broker_url, detector_name):
    result = run("std-daq", "kill", "1a2", "--tag", detector_name, url=broker_url)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'1a2' is too short: give at least 4 characters of the request id" in result.stderr


# -- the broker ----------------------------------------------------------------------------------------

@pytest.mark.broker
def test_a_wrong_broker_password_is_called_a_refused_login_not_a_broker_that_is_down(broker_url, detector_name):
    wrong = broker_url.replace("guest:guest@", "guest:not-the-password@")
    assert wrong != broker_url
    result = run("std-daq", "write", "/tmp/x.h5", "5", "--tag", detector_name, url=wrong)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the login: wrong user name or password in the broker URL ($STD_DAQ_BROKER_URL" in result.stderr
    assert "is it running" not in result.stderr
    assert "not-the-password" not in result.stderr and "Traceback" not in result.stderr


def test_a_broker_that_does_not_answer_is_still_asked_about():
    nothing_there = f"amqp://guest:guest@127.0.0.1:{free_tcp_port_block(1)}/%2F"
    result = run("std-daq", "write", "/tmp/x.h5", "5", "--tag", "DET", url=nothing_there)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot reach RabbitMQ" in result.stderr and "is it running? (rabbitmq-server -detached)" in result.stderr


# -- files ---------------------------------------------------------------------------------------------

def test_a_missing_config_file_is_named_as_a_file_not_as_a_config_key(tmp_path):
    missing = tmp_path / "no-such-config.json"
    result = run("std-daq", "status", str(missing))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot read the config file {missing}: No such file or directory" in result.stderr
    assert "config key" not in result.stderr


def test_pedestal_names_a_missing_dark_run_instead_of_passing_on_hdf5s_error(make_config, tmp_path):
    config_path, _ = make_config()  # a Jungfrau
    dark_run = tmp_path / "dark-run-that-is-not-there.h5"
    calibration = tmp_path / "pedestal.h5"
    result = run("std-daq", "pedestal", str(config_path), str(calibration), str(dark_run),
                 "--gain-from", str(tmp_path / "no-gains.h5"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"dark run {dark_run} does not exist" in result.stderr
    assert f"--gain-from file {tmp_path / 'no-gains.h5'} does not exist" in result.stderr
    assert "Unable to" not in result.stderr and "errno" not in result.stderr
    assert not calibration.exists()


# -- help ----------------------------------------------------------------------------------------------

def help_of(parser_argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args([*parser_argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes


def test_up_help_tells_how_services_are_started_restarted_and_stopped(capsys):
    text = help_of(["up"], capsys)
    assert "restarted after a pause of 1 s, doubling up to 30 s" in text
    assert "Ctrl-C or SIGTERM stops the services in the reverse order, receivers first" in text
    assert "removes the detector's shared-memory segments" in text


def test_kill_help_explains_the_request_id_and_the_timeout(capsys):
    text = help_of(["kill"], capsys)
    assert "request_id the request's id, or a prefix of it of at least 4 characters" in text
    assert "--current stop the write running now" in text
    assert "--timeout S seconds to wait for the agent's answer" in text and "(default 10)" in text


def test_every_option_of_std_udp_sim_has_a_help():
    parser = sim_cli.build_parser()
    unexplained = [action.dest for action in parser._actions if not action.help]
    assert unexplained == []
    text = " ".join(parser.format_help().split())
    assert "--n-images N|forever images to send, or 'forever' until Ctrl-C (default 100)" in text
    assert "so a run can be repeated (default 1)" in text


# -- monitor: a line when something changed, and whole messages -----------------------------------------

def status(action: str, message: str = "", request_id: str = "1a2b3c4d-0000-4000-8000-000000000001") -> StatusMessage:
    body = json.dumps({"output_file": "/data/run1.h5", "n_images": 100}).encode()
    return StatusMessage(request_id, action, "writer_agent", message, body)


def progress(n_written: int, **extra: object) -> StatusMessage:
    return status(broker.REQUEST_PROGRESS, json.dumps({"n_written": n_written, "n_images": 100, **extra}))


def test_monitor_prints_a_progress_line_only_when_it_changes():
    table = MonitorTable()
    shown = [table.update(s) for s in (status(broker.REQUEST_START), *[progress(0, state="writing")] * 5,
                                       progress(0, state="writing", waiting_for="std_h5_writer"),
                                       progress(0, state="writing", waiting_for="std_h5_writer"),
                                       progress(7, state="writing"), progress(7, state="writing"))]
    lines = [line for line in shown if line is not None]
    assert len(lines) == 4, lines
    assert lines[0].endswith("writer_agent: start")
    assert lines[1].endswith("writer_agent: writing 0/100")
    assert lines[2].endswith("writer_agent: writing 0/100 (waiting for std_h5_writer)")
    assert lines[3].endswith("writer_agent: writing 7/100")


def test_monitor_prints_long_messages_whole():
    table = MonitorTable()
    reason = "interrupted by a kill after 7 of 100 images; " + "/data/" + "deep/" * 40 + "run1.h5 is closed and holds them"
    assert table.update(status(broker.REQUEST_FAIL, reason)).endswith(f"writer_agent: FAIL: {reason}")
    warning = "67 image ids skipped in 1 gap " + "(and a long explanation) " * 10
    summary = json.dumps({"images_written": 100, "warning": warning})
    line = table.update(status(broker.REQUEST_SUCCESS, summary, request_id="5e6f7a8b-0000-4000-8000-000000000002"))
    assert line.endswith(f"writer_agent: success, 100 written; warning: {warning}")


def test_monitor_shows_kill_answers_on_the_request_they_name_and_leaves_out_request_lists():
    table = MonitorTable()
    full_id = "1a2b3c4d-0000-4000-8000-000000000001"
    table.update(status(broker.REQUEST_START, request_id=full_id))
    accepted = StatusMessage("current", "kill_accepted", "writer_agent", full_id, b"")
    assert table.update(accepted).endswith("run1.h5 (100 images)  writer_agent: kill accepted")
    refused = StatusMessage("dead", "kill_refused", "writer_agent", "no running or queued request dead", b"")
    assert table.update(refused).endswith(" kill refused by writer_agent: no running or queued request dead")
    assert table.update(StatusMessage("9f8e", "request_list", "writer_agent", "[]", b"{}")) is None
    assert list(table.rows) == [full_id, "kill dead"]
