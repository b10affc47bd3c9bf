"""A TCP relay to the real RabbitMQ that a test can turn into a blackhole, for the agent's side only.

`blackhole()` cuts the relayed connections and stops accepting: new connections then sit in the listen
backlog, connected as far as TCP goes but never answered, which is what a broker behind a dead route or a
hung broker looks like to a client (its connection attempts block until their timeout). `restore()` goes
back to relaying. The shared broker itself is never touched.
"""
from __future__ import annotations

import socket
import threading


class BrokerProxy:
    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self._relaying = threading.Event()
        self._relaying.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def blackhole(self) -> None:
        self._relaying.clear()
        self._cut()

    def restore(self) -> None:
        self._relaying.set()

    def close(self) -> None:
        self._closed.set()
        self._relaying.set()
        self._acceptor.join(5)
        self.listener.close()
        self._cut()
        for thread in self._threads:
            thread.join(5)

    def _cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            if not self._relaying.wait(0.05):
                continue  # blackhole: connections wait unanswered in the backlog
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self._threads.append(thread)
                thread.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the other too
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
