"""Batched UDP receive: up to `batch` datagrams per system call, each split into header and payload.

With `recvmmsg(2)` (Linux, called through ctypes) every message has three iovecs:

    iov[0]  its row of `headers`             header_bytes   (always)
    iov[1]  where its payload should go       data_bytes     (set per call by the caller: `data_base`)
    iov[2]  `spill`, shared by all messages  anything longer (Gigafrost padding; oversized datagrams)

so the caller can point iov[1] straight at the place in a FrameBuffer slot where the packet belongs and
the kernel's copy is the only one. `data_base` is a numpy view of the iov[1] base addresses: one numpy
assignment aims a whole batch. `lengths` is a view of the messages' msg_len, which with MSG_TRUNC is a
datagram's real size, so a datagram that spilled over shows up as a length no valid packet has.

Where recvmmsg is missing (or the config turns it off), a `recv_into` loop receives each datagram whole
into a staging row; `headers` then holds copies of the staged headers and `scratch` is a view of the
staged payloads, so the caller sees the same arrays and only `direct` (False) tells it that aiming has no
effect: every payload is in its scratch row. `path` names the path that runs, for the logs and the
benchmark.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket

import numpy as np

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
_PEEK_FLAGS = int(socket.MSG_PEEK) | MSG_DONTWAIT | MSG_TRUNC  # plain ints: IntFlag arithmetic costs
SPILL_BYTES = 4096  # only its first byte matters: a datagram that reaches it is too long


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


def load_libc_function(name: str, argtypes: list):
    """A libc function through ctypes (with errno), or None where libc has no such function."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    func.argtypes = argtypes
    func.restype = ctypes.c_int
    return func


_RECVMMSG = load_libc_function("recvmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p])


class BatchReceiver:
    def __init__(self, sock: socket.socket, batch: int, header_bytes: int, data_bytes: int, max_datagram: int,
                 *, use_recvmmsg: bool = True) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.header_bytes, self.data_bytes = header_bytes, data_bytes
        self.headers = np.zeros((batch, header_bytes), dtype=np.uint8)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self._peek = bytearray(header_bytes)
        self.direct = use_recvmmsg and _RECVMMSG is not None
        self.path = "recvmmsg" if self.direct else "recv_into"
        if self.direct:
            self.scratch = np.zeros((batch, data_bytes), dtype=np.uint8)
            self.spill = np.zeros(max(SPILL_BYTES, max_datagram), dtype=np.uint8)
            self._iovecs = (IoVec * (3 * batch))()
            iov = np.frombuffer(self._iovecs, dtype=np.uint64).reshape(batch, 3, 2)  # (base, len) x 3
            iov[:, 0, 0] = self.headers.ctypes.data + np.arange(batch, dtype=np.uint64) * header_bytes
            iov[:, 0, 1] = header_bytes
            self.scratch_addresses = self.scratch.ctypes.data + np.arange(batch, dtype=np.uint64) * data_bytes
            iov[:, 1, 0] = self.scratch_addresses
            iov[:, 1, 1] = data_bytes
            iov[:, 2, 0] = self.spill.ctypes.data
            iov[:, 2, 1] = self.spill.nbytes
            self.data_base = iov[:, 1, 0]  # the caller aims message i's payload by setting data_base[i]
            self._msgs = (MMsgHdr * batch)()
            first_iov = ctypes.addressof(self._iovecs)
            for i in range(batch):  # once: the message headers never change, only what iov[1] points at
                self._msgs[i].msg_hdr.msg_iov = ctypes.cast(first_iov + 3 * i * ctypes.sizeof(IoVec),
                                                            ctypes.POINTER(IoVec))
                self._msgs[i].msg_hdr.msg_iovlen = 3
            self._msgs_address = ctypes.addressof(self._msgs)
            # msg_len of every message, read without a Python loop
            self.lengths = np.frombuffer(self._msgs, dtype=np.uint32).reshape(batch, -1)[
                :, MMsgHdr.msg_len.offset // 4]
        else:
            row_bytes = max_datagram + 1  # one more than any valid datagram: a longer one shows as too long
            self._staging = np.zeros((batch, row_bytes), dtype=np.uint8)
            self._rows = [memoryview(self._staging[i]) for i in range(batch)]
            self.scratch = self._staging[:, header_bytes:header_bytes + data_bytes]
            self.lengths = np.zeros(batch, dtype=np.int64)

    def wait(self, timeout_s: float) -> bool:
        """True when a datagram is waiting (or arrives within `timeout_s`)."""
        return bool(self._poller.poll(timeout_s * 1000))

    def peek(self) -> tuple[bytearray, int] | None:
        """The header bytes and the real length of the next datagram, left in the queue; None if none."""
        try:
            length = self.sock.recv_into(self._peek, self.header_bytes, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None
        return self._peek, length

    def receive(self, n_max: int) -> int:
        """Take what is queued (at most `n_max` <= batch datagrams) without blocking; returns how many."""
        if self.direct:
            n = _RECVMMSG(self.fd, self._msgs_address, n_max, MSG_DONTWAIT | MSG_TRUNC, None)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return 0
                raise OSError(err, os.strerror(err))
            return n
        n = 0
        while n < n_max:
            try:
                self.lengths[n] = self.sock.recv_into(self._rows[n], len(self._rows[n]), MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            n += 1
        if n:  # contiguous header rows, as the recvmmsg path has them (48 B each)
            self.headers[:n] = self._staging[:n, :self.header_bytes]
        return n
