"""Message boundaries of llama.cpp's RPC protocol (ggml-rpc.cpp), so that a `split.rpc` tunnel carries each
message as one tunnel message: llama.cpp writes a command as three sends (command byte, size, body) and a
reply as two (size, body), each its own TCP segment (TCP_NODELAY), and forwarding each alone would cost a
link round of its own (services/tunnels.py pump).

  to rpc-server    | command (u8) | size (u64, little-endian) | body (size bytes) |
  from rpc-server  | size (u64, little-endian) | body (size bytes) |

Only boundaries are read; no byte is changed, and a stream that does not frame this way is forwarded as
it comes after pump's short hold.
"""

from __future__ import annotations


class RpcFraming:
    """tunnels.Framing for one direction of one connection: `commands` for what llama-server sends."""

    def __init__(self, *, commands: bool):
        self.head_size = 9 if commands else 8
        self._head = bytearray()
        self._body_left = 0

    def feed(self, data: bytes) -> bool:
        at, end = 0, len(data)
        while at < end:
            if self._body_left:
                take = min(self._body_left, end - at)
                self._body_left -= take
                at += take
                continue
            take = min(self.head_size - len(self._head), end - at)
            self._head += data[at:at + take]
            at += take
            if len(self._head) == self.head_size:
                self._body_left = int.from_bytes(self._head[-8:], "little")
                self._head.clear()
        return not self._body_left and not self._head
