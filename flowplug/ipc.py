"""ZeroMQ over ``ipc://`` for the sockets of a run: addresses, the socket setup and close
sequence, and the timed receive the zmq-based transports share (zmq, shm, doctor)."""

from __future__ import annotations

import errno
import math
import os
import secrets
import sys
import tempfile
from typing import Any

from ._fds import guard_zmq_context
from .errors import ConfigError


def bind_ipc(sock: Any, run_id: str, what: str = "zmq socket") -> str:
    """Bind the zmq socket ``sock`` to a new ``ipc://`` address named after ``run_id``.

    On Linux the address is an abstract socket (no file, gone with the socket); elsewhere a
    socket file in ``$FLOWPLUG_PIPEDIR``, or in the temp directory when that is not set.

    :param what: what the socket is, for the error message.
    :returns: the address, for the workers to connect to.
    :raises flowplug.ConfigError: the path is longer than zmq allows, or the bind failed;
        the message names ``FLOWPLUG_PIPEDIR``, the way out in both cases.
    """
    import zmq  # the caller has it already: a zmq socket is given

    name = f"flowplug-{run_id}-{secrets.token_hex(8)}"
    if sys.platform.startswith("linux"):
        address = f"ipc://@{name}"
    else:
        path = os.path.join(os.environ.get("FLOWPLUG_PIPEDIR") or tempfile.gettempdir(), name)
        limit = getattr(zmq, "IPC_PATH_MAX_LEN", 107)
        if len(path) > limit:
            raise ConfigError(
                f"the ipc pipe path {path!r} has {len(path)} characters, more than the "
                f"{limit} zmq allows; set FLOWPLUG_PIPEDIR to a shorter directory (e.g. /tmp)"
            )
        address = f"ipc://{path}"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(
            f"cannot bind the {what} {address}: {exc}. On a network file system, set "
            "FLOWPLUG_PIPEDIR to a local directory"
        ) from exc
    return address


def out_of_fds(exc: BaseException, what: str) -> ConfigError | None:
    """The error to raise instead of ``exc`` (an ``OSError``, zmq's ``ZMQError``) when the
    process ran out of file descriptors doing ``what``: a ConfigError naming
    ``RLIMIT_NOFILE`` and the way out; else None (raise ``exc`` itself)."""
    if getattr(exc, "errno", None) not in (errno.EMFILE, errno.ENFILE):
        return None
    return ConfigError(
        f"cannot {what}: {exc}. The process is out of file descriptors (RLIMIT_NOFILE): "
        "raise the limit (`ulimit -n 4096` in the shell), or close files"
    )


class ZmqSockets:
    """One zmq context and the sockets made from it, closed together: the setup and close
    sequence every zmq-based transport needs, on either side.

    Example, a worker's sender::

        sockets = ZmqSockets()
        sock = sockets.connect(zmq.PUSH, endpoint.address, hwm=50, linger_ms=5000)
        ...
        sockets.close()  # waits up to linger_ms for what was sent to be delivered

    :raises flowplug.ConfigError: too few file descriptors are left for a zmq context
        (libzmq would abort the process).
    """

    def __init__(self) -> None:
        import zmq  # the caller uses zmq already: importing it here costs nothing more

        guard_zmq_context()  # libzmq aborts the process when it runs out of fds
        try:  # the guard counted room, but another thread (zmq's I/O) may take it first
            self.ctx = zmq.Context()
        except zmq.ZMQError as exc:
            fds = out_of_fds(exc, "start a zmq context")
            if fds is None:
                raise
            raise fds from exc
        self._sockets: list[Any] = []
        #: (listening socket, its monitor) per socket whose accepts are watched.
        self._watched: list[tuple[Any, Any]] = []

    def connect(self, kind: int, address: str, *, hwm: int, linger_ms: int = 0) -> Any:
        """Return a new socket of ``kind`` (``zmq.PUSH``, ``zmq.PULL``) connected to ``address``.

        :param hwm: the high-water mark of the socket's direction (send for PUSH).
        :param linger_ms: how long :meth:`close` keeps trying to deliver what was sent.
        :raises flowplug.ConfigError: no file descriptor left for the socket (every socket
            of this object is closed then).
        """
        import zmq

        try:
            sock = self._socket(kind, hwm, linger_ms)
            sock.connect(address)
        except zmq.ZMQError as exc:
            self.close()  # a worker's sender being made: its close() will not run
            fds = out_of_fds(exc, f"connect a zmq socket to {address}")
            if fds is None:
                raise
            raise fds from exc
        return sock

    def bind(
        self, kind: int, run_id: str, *, hwm: int, what: str = "zmq socket"
    ) -> tuple[Any, str]:
        """Return a new socket of ``kind`` bound by :func:`bind_ipc`, and its address.

        The socket does not linger: the consumer closes it only once its workers are gone.
        On an error every socket of this object is closed (the caller's ``close`` may not
        run: ``open`` failed).

        :raises flowplug.ConfigError: as :func:`bind_ipc`.
        """
        sock = self._socket(kind, hwm, 0)
        try:
            address = bind_ipc(sock, run_id, what)
        except ConfigError:
            self.close()
            raise
        return sock, address

    def watch_accepts(self, sock: Any) -> None:
        """Count the connections the bound socket ``sock`` accepts, for
        :meth:`await_accepts` (two sockets more, until then).

        Why: libzmq 4.3 aborts the whole process when its ipc listener cannot accept a
        connection for want of a file descriptor ("Too many open files
        (src/ipc_listener.cpp:...)"). A consumer that waits until its workers are
        connected (:meth:`flowplug.Transport.await_connections`) makes the accepts
        happen while the fds the Runner counted for them are still free.

        :raises flowplug.ConfigError: no fd left for the watch itself.
        """
        import zmq

        try:
            monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED)
        except zmq.ZMQError as exc:
            self.close()  # called from a transport's open(): its close() may not run
            raise ConfigError(
                f"cannot watch a zmq socket's connections: {exc}. If the process is out of "
                "file descriptors (RLIMIT_NOFILE), raise the limit (`ulimit -n 4096` in the "
                "shell), or close files"
            ) from exc
        self._watched.append((sock, monitor))

    def await_accepts(self, count: int, keep_waiting: Any) -> None:
        """Wait until every watched socket accepted ``count`` connections, or until
        ``keep_waiting()`` is false (asked every 0.1 s at most); then stop watching."""
        try:
            for _, monitor in self._watched:
                accepted = 0
                while accepted < count and keep_waiting():
                    if monitor.poll(100):
                        monitor.recv_multipart()  # one event: one connection accepted
                        accepted += 1
        finally:
            self._stop_watching()

    def _stop_watching(self) -> None:
        watched, self._watched = self._watched, []
        for sock, monitor in watched:
            sock.disable_monitor()
            monitor.close()

    def _socket(self, kind: int, hwm: int, linger_ms: int) -> Any:
        import zmq

        sock = self.ctx.socket(kind)
        if kind in (zmq.PUSH, zmq.PUB, zmq.DEALER):
            sock.sndhwm = hwm
        else:
            sock.rcvhwm = hwm
        sock.linger = linger_ms
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        """Close every socket (each after its own linger), then the context. Idempotent."""
        self._stop_watching()  # before the context ends: it waits for every socket
        sockets, self._sockets = self._sockets, []
        for sock in reversed(sockets):
            sock.close()
        if not self.ctx.closed:
            self.ctx.term()


def recv_within(sock: Any, timeout: float, *, multipart: bool = False, copy: bool = True) -> Any:
    """The next message of the zmq socket ``sock``, or None when none came within
    ``timeout`` seconds: the receive a :meth:`~flowplug.TaskReceiver.recv` needs.

    Tries without waiting first (one call while messages flow), then polls, rounding the
    wait up to whole milliseconds (a short timeout never becomes a non-blocking poll).

    :param multipart: receive every frame of the message (``recv_multipart``), as a list;
        otherwise its one frame.
    :param copy: as pyzmq's: False gives ``zmq.Frame`` objects instead of bytes.
    """
    import zmq  # the caller's socket is a zmq socket: zmq is imported already

    recv = sock.recv_multipart if multipart else sock.recv
    try:
        return recv(zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        if not sock.poll(math.ceil(timeout * 1000)):
            return None
        return recv(copy=copy)
