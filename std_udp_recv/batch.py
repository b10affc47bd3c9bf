"""Batched UDP receive: up to `batch` datagrams per system call into one preallocated numpy array.

`recvmmsg(2)` is called through ctypes (Linux); where it is missing, a `recv_into` loop fills the same
array, so the receiver above never knows which path ran (`BatchReceiver.path` says, for the logs and the
benchmark). Each datagram lands in its own row of `buffer`; `lengths[i]` is its size. Rows are one byte
longer than the largest valid datagram, so an oversized datagram shows up as a length no valid one has.
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


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def _load_recvmmsg():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


_RECVMMSG = _load_recvmmsg()


class BatchReceiver:
    def __init__(self, sock: socket.socket, batch: int, max_datagram: int, *, use_recvmmsg: bool = True) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.batch = batch
        self.row_bytes = max_datagram + 1
        self.buffer = np.zeros((batch, self.row_bytes), dtype=np.uint8)
        self.lengths = np.zeros(batch, dtype=np.int64)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self.path = "recvmmsg" if (use_recvmmsg and _RECVMMSG is not None) else "recv_into"
        if self.path == "recvmmsg":
            self._iovecs = (_IoVec * batch)()
            self._msgs = (_MMsgHdr * batch)()
            base = self.buffer.ctypes.data
            for i in range(batch):
                self._iovecs[i].iov_base = base + i * self.row_bytes
                self._iovecs[i].iov_len = self.row_bytes
                self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovecs[i])
                self._msgs[i].msg_hdr.msg_iovlen = 1
            # msg_len of every message, read without a Python loop
            self._msg_len = np.frombuffer(self._msgs, dtype=np.uint32).reshape(batch, -1)[
                :, _MMsgHdr.msg_len.offset // 4]
        else:
            self._rows = [memoryview(self.buffer[i]) for i in range(batch)]

    def wait(self, timeout_s: float) -> bool:
        """True when a datagram is waiting (or arrives within `timeout_s`)."""
        return bool(self._poller.poll(timeout_s * 1000))

    def receive(self) -> int:
        """Take what is queued (at most `batch` datagrams) without blocking; returns how many."""
        if self.path == "recvmmsg":
            n = _RECVMMSG(self.fd, self._msgs, self.batch, MSG_DONTWAIT, None)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return 0
                raise OSError(err, os.strerror(err))
            self.lengths[:n] = self._msg_len[:n]
            return n
        n = 0
        while n < self.batch:
            try:
                self.lengths[n] = self.sock.recv_into(self._rows[n], self.row_bytes, MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            n += 1
        return n
