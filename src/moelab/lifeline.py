"""A rank's lifeline to the launcher on its host: who died first, whoever noticed first.

The launcher listens on an abstract Unix socket named in `MOELAB_LIFELINE`. Each rank
connects at start and says `"<rank> <pid>"`; a rank that leaves through Python's normal exit
path (return, exception, sys.exit) says `"bye"` first. The kernel closes the connection when
the process ends however it ends, so a connection that closes without a goodbye is a rank
that was killed (kill -9, OOM killer, segfault), and the launcher sees the closes in the order
they happened: before DeepSpeed's launcher or a peer stuck in a collective reacts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket

ENV = "MOELAB_LIFELINE"
GOODBYE = b"bye\n"

_held: list[socket.socket] = []


def connect() -> None:
    """Connect this rank to its host's launcher, if it listens (ranks on other hosts: no-op)."""
    name = os.environ.get(ENV)
    if not name or _held:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
        sock.sendall(f"{os.environ.get('RANK', '?')} {os.getpid()}\n".encode())
    except OSError:
        sock.close()
        return
    _held.append(sock)
    atexit.register(_goodbye)


def _goodbye() -> None:
    for sock in _held:
        with contextlib.suppress(OSError):
            sock.sendall(GOODBYE)
            sock.close()
    _held.clear()


def _forget_in_child() -> None:
    # A forked child (a data-loader worker) must neither hold the connection open after its
    # parent died nor say goodbye for it.
    for sock in _held:
        with contextlib.suppress(OSError):
            sock.close()
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)
