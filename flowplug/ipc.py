"""``ipc://`` addresses for the ZeroMQ sockets of a run (the zmq and shm transports, doctor)."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from typing import Any

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
