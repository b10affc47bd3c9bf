"""The project's own small error hierarchy.

Third-party errors (posix_ipc, zmq, h5py, pika) are caught at the edge of the module that calls them and
re-raised as one of these, so a service's top level only needs to know this file.
"""


class StdDaqError(Exception):
    """Base class of every error std-daq raises on purpose."""


class FormatError(StdDaqError):
    """A message or packet does not have the layout its decoder expects."""


class ConfigError(StdDaqError):
    """A configuration file is missing, unreadable, or has a wrong or missing key."""

    def __init__(self, key: str, value: object, expected: str, source: str = "") -> None:
        self.key = key
        self.value = value
        self.expected = expected
        self.source = source
        where = f"{source}: " if source else ""
        if value is _MISSING:
            text = f"{where}config key '{key}' is missing; expected {expected}"
        else:
            text = f"{where}config key '{key}' = {value!r} is invalid; expected {expected}"
        super().__init__(text)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
MISSING = _MISSING


class RingBufferError(StdDaqError):
    """Base for shared-memory ring buffer errors."""


class BufferLayoutError(RingBufferError):
    """An existing shared-memory segment does not have the layout the attaching process expects."""


class BufferMissingError(RingBufferError):
    """A segment that should exist (attach only) does not."""


class ImageLostError(StdDaqError):
    """The ring-buffer slot of an id holds another image: another id, or the same id written again (by
    another acquisition that numbered its images from 1 again): the image was overwritten or never written."""

    def __init__(self, wanted_id: int, found_id: int) -> None:
        self.wanted_id = wanted_id
        self.found_id = found_id
        if found_id == wanted_id:
            super().__init__(f"slot of id {wanted_id} holds another image with that id (a later acquisition's): "
                             f"image lost or overwritten")
        else:
            super().__init__(f"slot of id {wanted_id} holds id {found_id}: image lost or overwritten")
