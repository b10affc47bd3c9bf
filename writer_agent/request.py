"""Validation of write requests (DESIGN.md §5): body bytes in, a WriteRequest or a reason a person can act on.

Required: `output_file` (an absolute path inside the allowed directories, in an existing directory, not
an existing file) and `n_images` (an integer from 1 to the agent's `max_images`). Optional: `run_id`
(integer >= 0; default: derived from the time the request was taken) and `user_id` (integer >= 0, 0 = the
writer's own user). Other keys are kept and travel to the file's request attribute.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from core_buffer.output import OutputPathError, resolve_output_path

MAX_U32 = (1 << 32) - 1
MAX_U64 = (1 << 64) - 1
MAX_BODY_BYTES = 64 * 1024


class BadRequest(ValueError):
    """The message is the reason published in request_fail."""


@dataclass(frozen=True)
class WriteRequest:
    request_id: str
    output_file: str  # as resolved: symlinks and `..` gone
    n_images: int
    run_id: int
    user_id: int
    body: dict[str, Any]


def _int(body: dict, key: str, lo: int, hi: int, default: int | None = None, hi_from: str = "") -> int:
    """body[key] as an integer from lo to hi; `hi_from` names the config key that set hi, for the reason."""
    if key not in body:
        if default is None:
            raise BadRequest(f"the request lacks the key '{key}'")
        return default
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{key}' must be an integer, got {type(value).__name__} {_short(value)}")
    if not lo <= value <= hi:
        origin = f" ({hi} is the detector config's {hi_from})" if hi_from and value > hi else ""
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {value}{origin}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_request(request_id: str, body: bytes, *, output_dirs: tuple[str, ...], overwrite: bool,
                  max_images: int) -> WriteRequest:
    if not request_id:
        raise BadRequest("the request has no correlation_id (the request id)")
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted")
    try:
        parsed = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not JSON ({exc})") from None
    except RecursionError:  # a body of nothing but brackets, nested deeper than the parser recurses
        raise BadRequest("the request body nests JSON arrays or objects too deeply") from None
    if not isinstance(parsed, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(parsed).__name__}")
    n_images = _int(parsed, "n_images", 1, min(max_images, MAX_U32),
                    hi_from="writer_agent.max_images" if max_images <= MAX_U32 else "")
    run_id = _int(parsed, "run_id", 0, MAX_U64, default=time.time_ns() // 1000)
    user_id = _int(parsed, "user_id", 0, MAX_U32, default=0)
    if "output_file" not in parsed:
        raise BadRequest("the request lacks the key 'output_file'")
    output_file = parsed["output_file"]
    if not isinstance(output_file, str):
        raise BadRequest(f"'output_file' must be a string, got {type(output_file).__name__} {_short(output_file)}")
    if len(output_file) > 4096:
        raise BadRequest(f"'output_file' is {len(output_file)} characters long; paths are at most 4096")
    try:
        path = resolve_output_path(output_file, output_dirs, overwrite)
    except OutputPathError as exc:
        raise BadRequest(str(exc)) from None
    return WriteRequest(request_id, path, n_images, run_id, user_id, parsed)
