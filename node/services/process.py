"""One node per home: the pid file (held under an flock while the node runs), and systemd readiness."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path


class AlreadyRunning(RuntimeError):
    pass


class PidFile:
    """An flock'd pid file: the lock, not the file's existence, says a node runs (stale files are harmless)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise AlreadyRunning(
                    f"a node is already running with home {self.path.parent} (pid {read_pid(self.path) or '?'}); "
                    "stop it with `pinkybrain serve --stop`"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def running_pid(path: Path) -> int | None:
    """The pid of the node holding this pid file's lock, or None when no node holds it."""
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_pid(path)  # locked: a live node holds it
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def sd_notify(message: str) -> bool:
    """Send a systemd notification (READY=1, STOPPING=1, ...). The protocol is one datagram to
    $NOTIFY_SOCKET (abstract when it starts with '@'); no library needed for that."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def die_with_parent():
    """A preexec_fn that has the kernel SIGKILL a helper (rpc-server, llama-server) when the node that
    started it dies, even by SIGKILL, which leaves no chance to stop it. Linux only (prctl
    PR_SET_PDEATHSIG); None elsewhere. The signal follows the thread that forked the child: the node
    forks its helpers from its event-loop thread, which lives as long as the node."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the node died before the line above took effect
            os._exit(1)

    return preexec


_PR_SET_PDEATHSIG = 1
