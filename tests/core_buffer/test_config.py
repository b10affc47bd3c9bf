"""Config validation: each kind of mistake stops with its own message naming the key."""
import json
from pathlib import Path

import numpy as np
import pytest

from core_buffer import ConfigError, load_config, parse_config
from core_buffer.config import Section

BASE = {
    "detector_name": "JF01",
    "detector_type": "jungfrau",
    "n_modules": 2,
    "bit_depth": 16,
    "image_pixel_height": 1024,
    "image_pixel_width": 1024,
    "start_udp_port": 50000,
}

CONFIG_DIR = Path(__file__).resolve().parents[2] / "core_buffer" / "configs"


def config_with(**changes):
    raw = dict(BASE)
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    return parse_config(raw, "test.json")


def test_a_minimal_config_gets_the_documented_defaults():
    config = config_with()
    assert config.namespace == "std-daq"
    assert config.frame_buffer_slots == 256
    assert config.image_id_source == "frame_number"
    assert config.conversion == "raw"
    assert config.image_dtype == "<u2"
    assert config.shm_mode == 0o660
    assert config.udp_port(1) == 50001


@pytest.mark.parametrize("changes,message", [
    ({"n_modules": None}, r"config key 'n_modules' is missing; expected an integer from 1 to 1024"),
    ({"n_modules": "2"}, r"config key 'n_modules' = '2' is invalid; expected an integer"),
    ({"n_modules": True}, r"config key 'n_modules' = True is invalid"),
    ({"n_modules": 0}, r"'n_modules' = 0 is invalid; expected an integer from 1 to 1024"),
    ({"detector_type": "pilatus"}, r"'detector_type' = 'pilatus' is invalid; expected one of 'jungfrau'"),
    ({"detector_name": "bad name/x"}, r"'detector_name' = 'bad name/x' is invalid; expected a name of"),
    ({"bit_depth": 32}, r"'bit_depth' = 32 is invalid; expected one of 16"),
    ({"start_udp_port": 65535}, r"'start_udp_port' = 65535 is invalid; expected an integer from 1 to 65534"),
    ({"frame_buffer_slots": 1}, r"'frame_buffer_slots' = 1 is invalid"),
    ({"n_modlues": 2}, r"'n_modlues' = 2 is invalid; expected no such key \(check its spelling"),
    ({"conversion": "converted"}, r"'calibration_file' is missing; expected an absolute path"),
    ({"calibration_file": "cal.h5"}, r"'calibration_file' = 'cal.h5' is invalid; expected an absolute path"),
    ({"image_id_source": "bunch"}, r"'image_id_source' = 'bunch' is invalid; expected one of"),
    ({"shm_mode": "rw"}, r"'shm_mode' = 'rw' is invalid; expected an octal permission string"),
    ({"stats_interval_s": 0}, r"'stats_interval_s' = 0 is invalid; expected a number >= 0.05"),
    ({"writer": []}, r"'writer' = \[\] is invalid; expected a JSON object"),
    ({"module_positions": {"0": [0, 0, 1023, 511]}}, r"'module_positions' = .* one entry per module"),
    ({"module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1023]}},
     r"'module_positions.1' = \[0, 512, 1023\] is invalid; expected \[x0, y0, x1, y1\]"),
    ({"module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1024, 1023]}},
     r"'module_positions.1' = .* expected a rectangle inside the image \(1024 wide, 1024 high\)"),
])
def test_each_mistake_names_its_key_value_and_expectation(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_with(**changes)
    assert str(info.value).startswith("test.json: ")


def test_non_jungfrau_options_are_refused_for_other_detectors():
    eiger = dict(detector_type="eiger", n_modules=4, image_pixel_height=514, image_pixel_width=1030)
    with pytest.raises(ConfigError, match="'conversion' = 'converted' is invalid; expected 'raw'"):
        config_with(**eiger, conversion="converted", calibration_file="/c.h5")
    with pytest.raises(ConfigError, match="'image_id_source' = 'pulse_id' is invalid"):
        config_with(**eiger, image_id_source="pulse_id")
    with pytest.raises(ConfigError, match="'bit_depth' = 12 is invalid; expected one of 8, 16, 32"):
        config_with(**eiger, bit_depth=12)


GIGAFROST = dict(detector_type="gigafrost", n_modules=8, image_pixel_height=2016, image_pixel_width=2016)


def test_gigafrost_needs_eight_streams_and_a_packable_width():
    gf = GIGAFROST
    assert config_with(**gf).stream.packets_per_frame == 126
    with pytest.raises(ConfigError, match="'n_modules' = 4 is invalid; expected one of 8"):
        config_with(**{**gf, "n_modules": 4})
    with pytest.raises(ConfigError, match="'image_pixel_width' = 2000 is invalid; expected .*multiple of 48"):
        config_with(**{**gf, "image_pixel_width": 2000})


def test_a_bad_gigafrost_height_is_reported_as_the_height():
    with pytest.raises(ConfigError, match=r"'image_pixel_height' = 2018 is invalid; expected a multiple of 4") \
            as info:
        config_with(**{**GIGAFROST, "image_pixel_height": 2018})
    assert "image_pixel_width" not in str(info.value)


def test_a_gigafrost_width_too_large_for_a_packet_is_reported_as_the_width():
    with pytest.raises(ConfigError, match=r"'image_pixel_width' = 48000 is invalid; expected .*one row"):
        config_with(**{**GIGAFROST, "image_pixel_width": 48000})


def test_gigafrost_refuses_module_positions_it_would_ignore():
    positions = {str(i): [0, 0, 1007, 503] for i in range(8)}
    with pytest.raises(ConfigError, match=r"'module_positions' = .* is invalid; expected no such key for a "
                                          r"gigafrost .*remove the key"):
        config_with(**GIGAFROST, module_positions=positions)


@pytest.mark.parametrize("mode", ["0664", "0666", "0661", "0777", "007"])
def test_shm_mode_with_access_for_others_is_refused(mode):
    with pytest.raises(ConfigError, match=rf"'shm_mode' = '{mode}' is invalid; expected owner and group "
                                          r"permissions only"):
        config_with(shm_mode=mode)


@pytest.mark.parametrize("mode", ["0600", "0640", "0660", "660"])
def test_shm_mode_for_owner_and_group_is_accepted(mode):
    assert config_with(shm_mode=mode).shm_mode == int(mode, 8)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "missing.json")
    # The file is at fault, not a key: "config key '<file>' = ... is invalid" sent readers into the file.
    assert str(missing.value) == f"cannot read the config file {tmp_path / 'missing.json'}: No such file or directory"
    with pytest.raises(ConfigError, match=r"cannot read the config file .*: Is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"detector_name": "x",\n}')
    with pytest.raises(ConfigError) as not_json:
        load_config(bad)
    assert str(not_json.value) == f"the config file {bad} is not valid JSON: Expecting property name enclosed in " \
        "double quotes at line 2 column 1"
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(ConfigError, match=r"'<top level>' = \[\] is invalid; expected a JSON object"):
        load_config(listed)


def test_service_sections_are_validated_by_their_own_reader():
    config = config_with(writer={"allowed_dirs": ["/data"], "compression": "lz4", "typo": 1})
    section = config.section("writer")
    assert section.str_list("allowed_dirs", absolute_paths=True) == ("/data",)
    with pytest.raises(ConfigError, match=r"'writer.compression' = 'lz4' is invalid; expected one of"):
        section.str("compression", "none", choices=("none", "bitshuffle-lz4"))
    with pytest.raises(ConfigError, match=r"'writer.typo' = 1 is invalid; expected no such key"):
        section.finish()
    assert config.section("assembler").int("timeout_ms", 500) == 500


def test_section_reader_checks_ranges_and_booleans():
    section = Section({"a": 1.5, "b": "yes", "c": -1}, "x")
    assert section.float("a", min=0) == 1.5
    with pytest.raises(ConfigError, match="'x.b' = 'yes' is invalid; expected true or false"):
        section.bool("b")
    with pytest.raises(ConfigError, match="'x.c' = -1 is invalid; expected an integer >= 0"):
        section.int("c", min=0)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_example_configs_are_valid(path):
    config = load_config(path)
    raw = json.loads(path.read_text())
    assert config.detector_name == raw["detector_name"]
    assert config.stream.frame_bytes > 0


def test_the_shipped_examples_cover_every_detector():
    types = {json.loads(p.read_text())["detector_type"] for p in CONFIG_DIR.glob("*.json")}
    assert types == {"jungfrau", "eiger", "gigafrost"}


# The four examples issue 2 asks for: (file, detector type, modules/streams, image height x width).
NAMED_EXAMPLES = [
    ("jungfrau_1m.json", "jungfrau", 1, (512, 1024)),  # one Jungfrau module
    ("jungfrau_4m.json", "jungfrau", 8, (4096, 1024)),  # Jungfrau 4M: 8 modules of 512 x 1024
    ("eiger_500k.json", "eiger", 4, (514, 1030)),  # one Eiger module: 4 half-module ports, chip gaps
    ("gigafrost_2016.json", "gigafrost", 8, (2016, 2016)),  # 4 quadrants x 2 links
]


@pytest.mark.parametrize("name,detector_type,n_modules,shape", NAMED_EXAMPLES, ids=lambda v: str(v))
def test_each_named_example_config_exists_loads_and_places_its_modules(name, detector_type, n_modules, shape):
    from std_assembler.geometry import Placer

    path = CONFIG_DIR / name
    assert path.is_file(), f"the example config {name} is not shipped"
    config = load_config(path)
    assert (config.detector_type, config.n_modules, config.image_shape) == (detector_type, n_modules, shape)
    placer = Placer(config)  # refuses positions that do not fit the image or the detector's frames
    covered = placer.coverage()
    assert covered.shape == shape
    # Every module lands somewhere in the image, and no two modules overlap.
    hits = np.zeros(shape, np.int32)
    for module in range(config.n_modules):
        target = placer.target(hits, module)
        assert target.size > 0, f"{name}: module {module} has no place in the image"
        target[...] += 1
    assert hits.max() == 1
    assert (hits == 1).sum() >= covered.sum() > 0


def test_bundled_configs_serve_metrics_on_ports_no_other_bundled_config_uses():
    from core_buffer.metrics import SERVICE_PORT_OFFSETS, metrics_endpoint

    owner: dict[tuple[str, int], str] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        config = load_config(path)
        endpoints = [metrics_endpoint(config, service) for service in SERVICE_PORT_OFFSETS
                     if service != "std_udp_recv"]
        endpoints += [metrics_endpoint(config, "std_udp_recv", m) for m in range(config.n_modules)]
        assert None not in endpoints, f"{path.name} has no metrics base_port: std-daq status would show nothing"
        assert len(set(endpoints)) == len(endpoints), f"{path.name}: two of its services share a port"
        for host, port in endpoints:
            assert host == "127.0.0.1"
            assert (host, port) not in owner, f"{path.name} and {owner[(host, port)]} both use port {port}"
            owner[(host, port)] = path.name
