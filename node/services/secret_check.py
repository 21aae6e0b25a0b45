"""The weak-secret check (core/secrets.py) run beside the node's start, in a forked child.

Importing zxcvbn (its dictionaries) and estimating a 43-character secret is 0.08-0.1 s of a node's
start on the 2-core development VM, and the node imports its API front and runtime (as long again) in
the meantime: a child forked before those imports does the check on the other core. The verdict is
still awaited before anything else happens (identity, pid file, port), so a weak secret is refused
exactly as before, with the same message. Where fork is not safe or not available (not Linux, threads
already running) or the child gives no verdict, the check runs here, as it always did. The node also
never holds zxcvbn's dictionaries this way.
"""

from __future__ import annotations

import os
import sys
import threading

from pinkybrain.node.core.secrets import WeakSecretError, check_secret

_OK, _WEAK = b"ok", b"weak:"


class SecretCheck:
    """`SecretCheck.start(secret)` starts the check; `.result()` returns, or raises WeakSecretError."""

    def __init__(self, secret: str | None):
        self.secret = secret
        self._pid: int | None = None
        self._fd: int | None = None

    @classmethod
    def start(cls, secret: str | None) -> SecretCheck:
        check = cls(secret)
        # A fork copies only the calling thread: safe while this is the only one (no event loop, no
        # worker threads yet). macOS discourages fork without exec; there the check runs inline.
        if sys.platform != "linux" or threading.active_count() != 1:
            return check
        try:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
        except OSError:
            return check
        if pid == 0:  # the child: the verdict into the pipe, then exit without running the parent's clean-up
            try:
                os.close(read_fd)
                try:
                    check_secret(secret)
                    verdict = _OK
                except WeakSecretError as exc:
                    verdict = _WEAK + str(exc).encode()  # never contains the secret (core/secrets.py)
                os.write(write_fd, verdict[:60_000])
            finally:
                os._exit(0)
        os.close(write_fd)
        check._pid, check._fd = pid, read_fd
        return check

    def result(self) -> None:
        verdict = self._collect()
        if verdict == _OK:
            return
        if verdict is not None and verdict.startswith(_WEAK):
            raise WeakSecretError(verdict[len(_WEAK):].decode(errors="replace"))
        check_secret(self.secret)  # no child, or it gave no verdict: decide here

    def _collect(self) -> bytes | None:
        if self._fd is None:
            return None
        chunks = []
        try:
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
        except OSError:
            chunks = []
        finally:
            os.close(self._fd)
            self._fd = None
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
        return b"".join(chunks) or None
