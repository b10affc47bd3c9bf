"""The detector configuration (DESIGN.md §7): one JSON file per detector, validated at start.

Every error is a ConfigError naming the key, the value and what was expected. The top level holds the
detector's keys and the keys every service shares (buffers, ids, names); each service validates its own
section (`"udp_recv": {...}`, `"writer": {...}`, ...) with a `Section` reader in its own config.py.
Unknown keys are errors, so a typo stops the service instead of silently taking a default.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from core_buffer import detectors
from core_buffer.detectors import StreamGeometry
from core_buffer.errors import MISSING, ConfigError

# Sections that belong to one service each; the core loader keeps them for the service to validate.
SERVICE_SECTIONS = ("udp_recv", "assembler", "writer", "writer_agent", "stream_send", "stream_recv",
                    "metrics", "web")

# Defaults of the shared keys (documented in docs/configuration.md).
DEFAULT_NAMESPACE = "std-daq"
DEFAULT_IPC_DIR = "/tmp"
DEFAULT_FRAME_BUFFER_SLOTS = 256
DEFAULT_IMAGE_BUFFER_SLOTS = 512
DEFAULT_STATS_INTERVAL_S = 10.0
# The one form of the statistics line (core_buffer.service.StatsReporter): "influx", InfluxDB line protocol
# on stdout, which the existing std-daq dashboards read; "keyvalue", `stats name=value ...` in the log.
STATS_LOG_FORMS = ("influx", "keyvalue")
DEFAULT_STATS_LOG = "influx"
DEFAULT_SHM_MODE = "0660"
DEFAULT_FILE_MODE = "0640"
IMAGE_ID_SOURCES = ("frame_number", "pulse_id")
CONVERSIONS = ("raw", "converted")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REQUIRED = MISSING


class Section:
    """Typed, validated reads of one JSON object; `finish()` rejects the keys nobody read."""

    def __init__(self, raw: Any, prefix: str = "", source: str = "") -> None:
        self.prefix = prefix
        self.source = source
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(prefix or "<top level>", raw, "a JSON object", source)
        self._raw = raw
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(self.key(name), value, expected, self.source)

    def _get(self, name: str, default: Any, expected: str) -> tuple[Any, bool]:
        self._read.add(name)
        if name in self._raw:
            return self._raw[name], True
        if default is REQUIRED:
            raise ConfigError(self.key(name), MISSING, expected, self.source)
        return default, False

    def value(self, name: str, default: Any, expected: str, check: Callable[[Any], bool]) -> Any:
        value, given = self._get(name, default, expected)
        if given and not check(value):
            raise self.error(name, value, expected)
        return value

    def int(self, name: str, default: Any = REQUIRED, *, min: int | None = None,
            max: int | None = None, choices: Sequence[int] | None = None) -> int:
        expected = _int_expectation(min, max, choices)
        return self.value(name, default, expected, lambda v: _is_int(v) and _in_range(v, min, max, choices))

    def float(self, name: str, default: Any = REQUIRED, *, min: float | None = None,
              max: float | None = None) -> float:
        expected = "a number" + _range_text(min, max)
        value = self.value(name, default, expected,
                           lambda v: (_is_int(v) or isinstance(v, float)) and _in_range(v, min, max, None))
        return float(value) if value is not None else None

    def str(self, name: str, default: Any = REQUIRED, *, choices: Sequence[str] | None = None,
            pattern: re.Pattern[str] | None = None, expected: str | None = None) -> str:
        expected = expected or (f"one of {', '.join(map(repr, choices))}" if choices else "a string")
        return self.value(name, default, expected, lambda v: isinstance(v, str)
                          and (choices is None or v in choices)
                          and (pattern is None or pattern.match(v) is not None))

    def bool(self, name: str, default: Any = REQUIRED) -> bool:
        return self.value(name, default, "true or false", lambda v: isinstance(v, bool))

    def path(self, name: str, default: Any = REQUIRED, *, absolute: bool = True) -> str | None:
        expected = "an absolute path" if absolute else "a path"
        return self.value(name, default, expected, lambda v: isinstance(v, str) and v != ""
                          and (not absolute or os.path.isabs(v)))

    def str_list(self, name: str, default: Any = REQUIRED, *, absolute_paths: bool = False,
                 min_len: int = 0) -> tuple[str, ...]:
        expected = "a list of absolute paths" if absolute_paths else "a list of strings"
        if min_len:
            expected += f" with at least {min_len} entries"
        value = self.value(name, default, expected, lambda v: isinstance(v, list) and len(v) >= min_len
                           and all(isinstance(s, str) and (not absolute_paths or os.path.isabs(s))
                                   for s in v))
        return tuple(value) if value is not None else None

    def section(self, name: str) -> Section:
        value, _ = self._get(name, {}, "a JSON object")
        return Section(value, self.key(name), self.source)

    def raw(self, name: str, default: Any = None) -> Any:
        value, _ = self._get(name, default, "")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            raise ConfigError(self.key(unknown[0]), self._raw[unknown[0]],
                              "no such key (check its spelling; known keys: "
                              f"{', '.join(sorted(self._read))})", self.source)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_range(v: Any, lo: Any, hi: Any, choices: Iterable[Any] | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi) and (choices is None or v in choices)


def _range_text(lo: Any, hi: Any) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _int_expectation(lo: Any, hi: Any, choices: Sequence[int] | None) -> str:
    if choices:
        return "one of " + ", ".join(map(str, choices))
    return "an integer" + _range_text(lo, hi)


@dataclass(frozen=True)
class ModulePosition:
    """Where a module's frame goes in the image: its first pixel (row 0, col 0) at (x0, y0) and its
    last pixel at (x1, y1), both inclusive. x1 < x0 mirrors the frame left-right, y1 < y0 flips it."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return abs(self.x1 - self.x0) + 1

    @property
    def height(self) -> int:
        return abs(self.y1 - self.y0) + 1


@dataclass(frozen=True)
class DetectorConfig:
    detector_name: str
    detector_type: str
    n_modules: int
    bit_depth: int
    image_pixel_height: int
    image_pixel_width: int
    start_udp_port: int
    module_positions: tuple[ModulePosition, ...] | None = None
    namespace: str = DEFAULT_NAMESPACE
    ipc_dir: str = DEFAULT_IPC_DIR
    frame_buffer_slots: int = DEFAULT_FRAME_BUFFER_SLOTS
    image_buffer_slots: int = DEFAULT_IMAGE_BUFFER_SLOTS
    image_id_source: str = "frame_number"
    jungfrau_interfaces: int = 1
    conversion: str = "raw"
    calibration_file: str | None = None
    background_file: str | None = None
    flatfield_file: str | None = None
    stats_interval_s: float = DEFAULT_STATS_INTERVAL_S
    stats_log: str = DEFAULT_STATS_LOG
    shm_mode: int = 0o660
    output_dirs: tuple[str, ...] = ()
    overwrite_files: bool = False
    file_mode: int = 0o640
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    source: str = ""

    @property
    def stream(self) -> StreamGeometry:
        """Geometry of what each UDP stream (module) sends."""
        if self.detector_type == detectors.JUNGFRAU:
            return detectors.jungfrau_stream(self.jungfrau_interfaces)
        if self.detector_type == detectors.EIGER:
            return detectors.eiger_stream(self.bit_depth)
        return detectors.gigafrost_stream(self.image_pixel_height, self.image_pixel_width)

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_pixel_height, self.image_pixel_width)

    @property
    def image_dtype(self) -> str:
        """numpy dtype of the assembled images in the ImageBuffer."""
        if self.conversion == "converted" or self.background_file or self.flatfield_file:
            return "<f4"
        return self.stream.pixel_dtype.str

    @property
    def image_bytes(self) -> int:
        import numpy as np

        return self.image_pixel_height * self.image_pixel_width * np.dtype(self.image_dtype).itemsize

    def udp_port(self, module_id: int) -> int:
        return self.start_udp_port + module_id

    def section(self, name: str) -> Section:
        """The validated-on-read section of one service (empty when the file has none)."""
        if name not in SERVICE_SECTIONS:
            raise KeyError(f"{name} is not a service section ({', '.join(SERVICE_SECTIONS)})")
        return Section(self.sections.get(name, {}), name, self.source)


class ConfigFileUnreadable(ConfigError):
    """The config file itself cannot be read (missing, a directory, no permission) or is not JSON: no key is
    at fault, so the message names the file and the reason instead of ConfigError's 'config key ... is
    invalid'."""

    def __init__(self, source: str, reason: str, problem: str = "") -> None:
        super().__init__("<file>", source, f"a readable JSON config file ({reason})", source)
        text = f"the config file {source} {problem}: {reason}" if problem else \
            f"cannot read the config file {source}: {reason}"
        self.args = (text,)  # what str() shows


def load_config(path: str | os.PathLike[str]) -> DetectorConfig:
    """Read and validate a detector config file; raises ConfigError naming the problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileUnreadable(source, exc.strerror or str(exc)) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileUnreadable(source, f"{exc.msg} at line {exc.lineno} column {exc.colno}",
                                   "is not valid JSON") from None
    return parse_config(raw, source)


def parse_config(raw: Any, source: str = "") -> DetectorConfig:
    top = Section(raw, "", source)
    name_expected = "a name of letters, digits, '_', '.', '-' (at most 64, used in shm and ipc names)"
    detector_name = top.str("detector_name", pattern=_NAME_RE, expected=name_expected)
    detector_type = top.str("detector_type", choices=detectors.DETECTOR_TYPES)
    if detector_type == detectors.GIGAFROST:
        n_modules = top.int("n_modules", choices=(detectors.GF_N_STREAMS,))
        bit_depth = top.int("bit_depth", choices=(12, 16))
    elif detector_type == detectors.EIGER:
        n_modules = top.int("n_modules", min=1, max=1024)
        bit_depth = top.int("bit_depth", choices=(8, 16, 32))
    else:
        n_modules = top.int("n_modules", min=1, max=1024)
        bit_depth = top.int("bit_depth", choices=(16,))
    height = top.int("image_pixel_height", min=1, max=65535)
    width = top.int("image_pixel_width", min=1, max=65535)
    start_udp_port = top.int("start_udp_port", min=1, max=65535 - n_modules + 1)
    if detector_type == detectors.GIGAFROST:
        _check_gigafrost_image(top, height, width)
        if "module_positions" in raw:
            # The quadrant layout of a Gigafrost is fixed by the sensor (docs/detectors.md); a rectangle per
            # stream would be read and then ignored, so it is refused instead.
            raise top.error("module_positions", raw["module_positions"],
                            "no such key for a gigafrost (its 8 streams always fill the image's four "
                            "quadrants; remove the key)")
    positions = _module_positions(top, n_modules, height, width)

    jungfrau_interfaces = top.int("jungfrau_interfaces", 1, choices=(1, 2))
    conversion = top.str("conversion", "raw", choices=CONVERSIONS)
    calibration_file = top.path("calibration_file", None)
    if detector_type != detectors.JUNGFRAU:
        if conversion != "raw":
            raise top.error("conversion", conversion, "'raw' (conversion exists for Jungfrau only)")
        if jungfrau_interfaces != 1:
            raise top.error("jungfrau_interfaces", jungfrau_interfaces, "1 for a non-Jungfrau detector")
    if conversion == "converted" and calibration_file is None:
        raise ConfigError("calibration_file", MISSING,
                          "an absolute path to the calibration HDF5 file (needed by conversion "
                          "'converted')", source)
    image_id_source = top.str("image_id_source", "frame_number", choices=IMAGE_ID_SOURCES)
    if image_id_source == "pulse_id" and detector_type != detectors.JUNGFRAU:
        raise top.error("image_id_source", image_id_source, "'frame_number' for a non-Jungfrau detector")

    mode_pattern = re.compile(r"^0?[0-7]{3}$")
    shm_mode_text = top.str("shm_mode", DEFAULT_SHM_MODE, pattern=mode_pattern,
                            expected="an octal permission string such as \"0660\"")
    if int(shm_mode_text, 8) & 0o007:
        # Anyone on the host could then read the images, or write into the buffers and have forged or
        # corrupted data written to files as the detector's; services of other users share through the group.
        raise top.error("shm_mode", shm_mode_text,
                        "owner and group permissions only, no access for others (such as \"0660\")")
    file_mode_text = top.str("file_mode", DEFAULT_FILE_MODE, pattern=mode_pattern,
                             expected="an octal permission string such as \"0640\"")
    config = DetectorConfig(
        detector_name=detector_name,
        detector_type=detector_type,
        n_modules=n_modules,
        bit_depth=bit_depth,
        image_pixel_height=height,
        image_pixel_width=width,
        start_udp_port=start_udp_port,
        module_positions=positions,
        namespace=top.str("namespace", DEFAULT_NAMESPACE, pattern=_NAME_RE, expected=name_expected),
        ipc_dir=top.path("ipc_dir", DEFAULT_IPC_DIR),
        frame_buffer_slots=top.int("frame_buffer_slots", DEFAULT_FRAME_BUFFER_SLOTS, min=2, max=1 << 20),
        image_buffer_slots=top.int("image_buffer_slots", DEFAULT_IMAGE_BUFFER_SLOTS, min=2, max=1 << 20),
        image_id_source=image_id_source,
        jungfrau_interfaces=jungfrau_interfaces,
        conversion=conversion,
        calibration_file=calibration_file,
        background_file=top.path("background_file", None),
        flatfield_file=top.path("flatfield_file", None),
        stats_interval_s=top.float("stats_interval_s", DEFAULT_STATS_INTERVAL_S, min=0.05),
        stats_log=top.str("stats_log", DEFAULT_STATS_LOG, choices=STATS_LOG_FORMS),
        shm_mode=int(shm_mode_text, 8),
        output_dirs=top.str_list("output_dirs", (), absolute_paths=True),
        overwrite_files=top.bool("overwrite_files", False),
        file_mode=int(file_mode_text, 8),
        sections=MappingProxyType({name: top.raw(name, {}) for name in SERVICE_SECTIONS}),
        source=source,
    )
    for name in SERVICE_SECTIONS:
        if not isinstance(config.sections[name], Mapping):
            raise top.error(name, config.sections[name], "a JSON object")
    top.finish()
    return config


def _check_gigafrost_image(top: Section, height: int, width: int) -> None:
    """A Gigafrost image splits into 4 quadrants of 12-pixel blocks sent by 2 links each: the width must
    be a multiple of 48 and the height of 4, and a quadrant row must fit a packet. Each error names the key
    that is wrong."""
    width_step = 2 * 2 * detectors.GF_PIXELS_PER_BLOCK
    if width % width_step:
        raise top.error("image_pixel_width", width,
                        f"a multiple of {width_step} for a gigafrost")
    if height % 4:
        raise top.error("image_pixel_height", height,
                        "a multiple of 4 for a gigafrost (each of its 8 streams carries a quarter of the rows)")
    try:
        detectors.gigafrost_stream(height, width)
    except ValueError as exc:  # a quadrant row that does not fit one packet: the width is too large
        raise top.error("image_pixel_width", width, str(exc)) from None


def _module_positions(top: Section, n_modules: int, height: int,
                      width: int) -> tuple[ModulePosition, ...] | None:
    raw = top.raw("module_positions", None)
    if raw is None:
        return None
    expected_keys = [str(i) for i in range(n_modules)]
    if not isinstance(raw, Mapping) or sorted(raw, key=_int_or_str) != expected_keys:
        raise top.error("module_positions", raw,
                        f"an object with one entry per module, keys \"0\" to \"{n_modules - 1}\"")
    positions = []
    for key in expected_keys:
        value = raw[key]
        full_key = f"module_positions.{key}"
        if not (isinstance(value, list) and len(value) == 4 and all(_is_int(v) for v in value)):
            raise ConfigError(full_key, value, "[x0, y0, x1, y1], four integers", top.source)
        x0, y0, x1, y1 = value
        if not (0 <= min(x0, x1) and max(x0, x1) < width and 0 <= min(y0, y1) and max(y0, y1) < height):
            raise ConfigError(full_key, value, f"a rectangle inside the image ({width} wide, {height} "
                              "high)", top.source)
        positions.append(ModulePosition(x0, y0, x1, y1))
    return tuple(positions)


def _int_or_str(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)
