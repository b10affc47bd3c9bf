"""std_web's parts that need no process: settings, the PNG encoder, the live-message check, the request
book's state machine, and the launcher and `std-daq status` knowing std_web."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from core_buffer import broker
from core_buffer.errors import ConfigError
from std_daq import status as daq_status
from std_daq.launcher import pipeline_services
from std_web.config import WebSettings
from std_web.pipeline import RequestBook, WriteRecord, live_address, parse_live
from std_web.png import encode_grey, to_png_samples
from tests.std_web.test_api import decode_png


def test_settings_default_to_loopback_port_5000_no_token_no_cors_and_everything_risky_off(make_config):
    _, config = make_config(web={"port": 5000})
    settings = WebSettings.from_config(config, environ={})
    assert (settings.host, settings.port, settings.token, settings.cors_origins) == ("127.0.0.1", 5000, None, ())
    assert not settings.allow_config_write and not settings.allow_simulation


def test_settings_refuse_unknown_keys_and_bad_values_naming_the_key(make_config, tmp_path):
    for web, key in (({"prot": 5000}, "web.prot"), ({"port": 0}, "web.port"), ({"cors_origins": "*"}, "web.cors_origins"),
                     ({"token_file": str(tmp_path / "missing")}, "web.token_file")):
        _, config = make_config(web=web)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            WebSettings.from_config(config, environ={})


def test_the_token_is_kept_out_of_the_settings_repr(make_config, tmp_path):
    (tmp_path / "token").write_text("abc123\n")
    _, config = make_config(web={"token_file": str(tmp_path / "token")})
    settings = WebSettings.from_config(config, environ={})
    assert settings.token == "abc123" and "abc123" not in repr(settings)
    assert WebSettings.from_config(config, environ={"STD_WEB_TOKEN": "envtoken"}).token == "envtoken"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_holds_the_exact_values(dtype):
    image = (np.arange(6 * 7, dtype=np.uint32).reshape(6, 7) * 1031 % np.iinfo(dtype).max).astype(dtype)
    assert (decode_png(encode_grey(image)) == image).all()


def test_png_samples_of_other_types_are_clipped_or_stretched():
    image = np.array([[-5.0, 0.4], [70000.0, np.nan]], np.float32)
    assert to_png_samples(image, "raw").tolist() == [[0, 0], [65535, 0]]
    assert to_png_samples(np.array([[2, 4], [6, 6]], np.uint32), "auto").tolist() == [[0, 127], [255, 255]]
    with pytest.raises(ValueError):
        encode_grey(np.zeros((2, 2), np.float32))


def test_live_messages_are_checked_before_use():
    header = {"htype": "array-1.0", "shape": [2, 3], "type": "uint16", "frame": 4, "image_id": 99, "status": 0,
              "is_good_frame": True}
    image = parse_live(json.dumps(header).encode(), memoryview(np.arange(6, dtype="<u2").tobytes()))
    assert image.image_id == 99 and image.pixels.tolist() == [[0, 1, 2], [3, 4, 5]]
    for bad, blob in (({**header, "shape": [2]}, 12), ({**header, "type": "object"}, 12), (header, 10),
                      ({**header, "htype": "other"}, 12)):
        with pytest.raises(ValueError):
            parse_live(json.dumps(bad).encode(), memoryview(bytes(blob)))
    with pytest.raises(ValueError):
        parse_live(b"not json", memoryview(bytes(12)))


def test_live_address_is_stream_send_live_with_a_wildcard_on_loopback(make_config):
    _, config = make_config(stream_send={"live": "tcp://*:9100"})
    assert live_address(config) == "tcp://127.0.0.1:9100"
    _, config = make_config()
    assert live_address(config) is None


def status(request_id: str, action: str, message: str = "") -> broker.StatusMessage:
    return broker.StatusMessage(request_id, action, "writer_agent", message, b"{}")


def test_the_book_follows_a_request_through_the_2023_states():
    book = RequestBook(lambda: None)
    record = WriteRecord("r1", "/data/a.h5", 10, 3, None, "web")
    book.add(record)
    assert book.writer_status(True)["state"] == "WRITING"
    book.on_status(status("r1", broker.REQUEST_START, "request taken by writer_agent"))
    assert record.state == "WAITING_IMAGES"
    book.on_status(status("r1", broker.REQUEST_PROGRESS, json.dumps({"n_written": 4, "n_images": 10, "state": "writing"})))
    assert (record.state, record.n_written) == ("ACQUIRING_IMAGES", 4)
    book.on_status(status("r1", broker.REQUEST_PROGRESS, json.dumps({"n_written": 10, "n_images": 10, "state": "writing"})))
    assert record.state == "FLUSHING_IMAGES"
    book.on_status(status("r1", broker.REQUEST_SUCCESS, json.dumps({"images_written": 10})))
    assert (record.state, record.message, record.done.is_set()) == ("FINISHED", "Completed.", True)
    assert book.writer_status(True)["state"] == "READY"
    assert book.writer_status(False)["state"] == "UNKNOWN"

    failed = WriteRecord("r2", "/data/b.h5", 10, None, None, "web")
    book.add(failed)
    book.on_status(status("r2", broker.REQUEST_FAIL, "'/data/b.h5' is outside the allowed directories"))
    assert failed.state == "FAILED" and failed.message.startswith("ERROR:")
    assert book.writer_status(True)["state"] == "UNKNOWN"
    book.reset_unknown()
    assert book.writer_status(True)["state"] == "READY"

    killed = WriteRecord("r3", "/data/c.h5", 100, None, None, "web")
    book.add(killed)
    book.on_status(status("r3", broker.REQUEST_FAIL, "interrupted by a kill after 7 of 100 images; /data/c.h5 is "
                                                     "closed and holds them"))
    assert (killed.state, killed.message, killed.n_written) == ("FINISHED", "Interrupted.", 7)
    assert [entry["request_id"] for entry in book.logs(2)] == ["r3", "r2"]


def test_the_launcher_runs_std_web_and_status_scrapes_it_when_the_config_has_a_web_section(make_config):
    path, config = make_config(web={"port": 5123}, metrics={"base_port": 9300})
    specs = {s.label: s for s in pipeline_services(str(path), config)}
    assert specs["web"].argv[-1] == str(path) and specs["web"].argv[0].endswith("std_web")
    assert specs["web"].stop_rank < min(s.stop_rank for s in specs.values() if s.label != "web")
    assert ("std_web", "std_web", ("127.0.0.1", 5123)) in daq_status.service_endpoints(config)
    path, config = make_config()
    assert "web" not in {s.label for s in pipeline_services(str(path), config)}
    assert all(label != "std_web" for label, _, _ in daq_status.service_endpoints(config))
