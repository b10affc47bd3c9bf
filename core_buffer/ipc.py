"""ZMQ addresses (DESIGN.md §1) and socket construction with explicit options, in one place."""
from __future__ import annotations

import os
import stat

import zmq

from core_buffer.config import DetectorConfig

# Lingers: PUSH streams get time to hand over what is queued on a clean stop; PUB/SUB never wait.
PUSH_LINGER_MS = 2000
DEFAULT_LINGER_MS = 0


def ipc_file(config: DetectorConfig, suffix: str) -> str:
    """A path of this detector's in ipc_dir: <ipc_dir>/<namespace>-<detector>-<suffix> (sockets, records)."""
    return os.path.join(config.ipc_dir, f"{config.namespace}-{config.detector_name}-{suffix}")


def _ipc(config: DetectorConfig, suffix: str) -> str:
    return f"ipc://{ipc_file(config, suffix)}"


def module_frames_address(config: DetectorConfig, module_id: int) -> str:
    """std_udp_recv (PUSH, bind) -> std_assembler (PULL, connect): ModuleFrame per finished frame."""
    return _ipc(config, f"frames-{module_id}")


def image_metadata_address(config: DetectorConfig) -> str:
    """std_assembler or std_stream_recv (PUB, bind) -> consumers (SUB): ImageMetadata per image."""
    return _ipc(config, "assembler")


def store_stream_address(config: DetectorConfig) -> str:
    """writer_agent (PUSH, bind) -> std_h5_writer (PULL, connect): StoreStream."""
    return _ipc(config, "writer_agent")


def writer_status_address(config: DetectorConfig) -> str:
    """std_h5_writer (PUSH, bind) -> writer_agent (PULL, connect): JSON writer status."""
    return _ipc(config, "writer_status")


def socket_files_bound_by(config: DetectorConfig, service: str, module_id: int | None = None) -> list[str]:
    """The ipc socket files `service` binds (std_udp_recv's by module id): what it removes when it stops,
    holding its role lock (core_buffer.locks), since ZMQ may leave them behind."""
    if service == "std_udp_recv":
        addresses = [] if module_id is None else [module_frames_address(config, module_id)]
    else:
        address = {"std_assembler": image_metadata_address, "std_stream_recv": image_metadata_address,
                   "writer_agent": store_stream_address, "std_h5_writer": writer_status_address}.get(service)
        addresses = [] if address is None else [address(config)]
    return [ipc_path(address) for address in addresses]


def detector_socket_files(config: DetectorConfig) -> list[str]:
    """Every ipc socket file the services of this detector's pipeline bind."""
    addresses = [module_frames_address(config, m) for m in range(config.n_modules)]
    addresses += [image_metadata_address(config), store_stream_address(config), writer_status_address(config)]
    return [ipc_path(address) for address in addresses]


def ipc_path(address: str) -> str | None:
    """The file behind an ipc:// address (None for other transports)."""
    return address[len("ipc://"):] if address.startswith("ipc://") else None


def make_socket(context: zmq.Context, kind: int, *, hwm: int, linger_ms: int | None = None,
                subscribe: bytes | None = None) -> zmq.Socket:
    """A socket with HWM and linger always set explicitly (SUB sockets also get their subscription)."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if linger_ms is None:
        linger_ms = PUSH_LINGER_MS if kind == zmq.PUSH else DEFAULT_LINGER_MS
    sock.setsockopt(zmq.LINGER, linger_ms)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe if subscribe is not None else b"")
    return sock


def remove_socket_file(path: str) -> bool:
    """Remove the ipc socket file at `path` if there is one; anything else there (a regular file, a
    directory, a symbolic link) is left alone. Call it only holding the lock of the role that binds it
    (core_buffer.locks): a socket file another process has bound is its only way in."""
    try:
        if not stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False  # gone already (ZMQ unlinked it itself), or not ours to remove
