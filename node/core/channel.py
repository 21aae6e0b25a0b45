"""Encrypted frames on an established link (after the handshake), and the per-peer rate limit.

Noise's own transport messages use an implicit nonce, so one frame altered or dropped by a man in the
middle would desynchronise the two ends for good. Frames here carry their counter explicitly, as
WireGuard's do, and it is authenticated with the frame:

    frame = version (1) | type (1) | counter (8, big-endian) | ChaCha20-Poly1305(key, nonce, header, data)
    nonce = 4 zero bytes | counter (8, little-endian)            (Noise's ChaChaPoly nonce layout)

The keys are the two Noise transport keys from Split(), one per direction. A receiver accepts a frame only
if its counter is above the last accepted one, which refuses replayed and reordered frames, and advances
only after the frame authenticates, so a forged, replayed or corrupted frame is dropped without
disturbing the genuine frames that follow it.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

FRAME_VERSION = 1
HEADER = struct.Struct(">BBQ")
TAG_LEN = 16
OVERHEAD = HEADER.size + TAG_LEN
TYPE_DATA = 1
FRAME_TYPES = frozenset({TYPE_DATA})
DEFAULT_MAX_FRAME = 1024 * 1024
# A sender stops long before the 64-bit counter could wrap; a link that old is simply re-established.
MAX_COUNTER = 2**63


class ChannelError(Exception):
    """Base of the channel's errors."""


class FrameTooLarge(ChannelError):
    """A message over the frame limit was refused at the sender; nothing was sent."""


class FrameRejected(ChannelError):
    """An incoming frame was dropped; `reason` is one of malformed, oversize, rate_limited, replay, auth."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RateLimitExceeded(ChannelError):
    """The peer kept sending over its rate limit after frames were dropped: the link should close."""


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    def __init__(self, rate: float, burst: float, *, clock=time.monotonic):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = float(burst)
        self.updated = clock()

    def refill(self, now: float | None = None) -> float:
        if now is None:
            now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    def take(self, amount: float = 1.0) -> bool:
        if self.refill() >= amount:
            self.tokens -= amount
            return True
        return False


@dataclass(frozen=True)
class RateLimits:
    frames_per_sec: float = 2000.0
    bytes_per_sec: float = 64 * 1024 * 1024
    burst_secs: float = 2.0
    # Dropped frames allowed before the link is closed: a short overshoot costs frames, a flood the link.
    drops_per_sec: float = 20.0
    drop_burst: float = 200.0


class RateLimiter:
    def __init__(self, limits: RateLimits, *, max_frame: int = DEFAULT_MAX_FRAME, clock=time.monotonic):
        self.limits = limits
        burst = max(limits.burst_secs, 0.1)
        self.frames = TokenBucket(limits.frames_per_sec, max(1.0, limits.frames_per_sec * burst), clock=clock)
        # The byte burst must admit at least one maximal frame, whatever the rate.
        self.bytes = TokenBucket(
            limits.bytes_per_sec, max(limits.bytes_per_sec * burst, max_frame + OVERHEAD), clock=clock
        )
        self.drops = TokenBucket(limits.drops_per_sec, limits.drop_burst, clock=clock)
        self.dropped = 0

    def admit(self, size: int) -> bool:
        """True: accept the frame. False: drop it. Raises RateLimitExceeded when drops keep coming."""
        now = self.frames.clock()  # one clock read for both buckets: this runs once per frame
        if self.frames.refill(now) >= 1 and self.bytes.refill(now) >= size:
            self.frames.tokens -= 1
            self.bytes.tokens -= size
            return True
        self.dropped += 1
        if not self.drops.take():
            raise RateLimitExceeded(f"peer kept sending over its rate limit ({self.dropped} frames dropped)")
        return False


class Channel:
    """Both directions of one link. `seal` and `open` must each be called in wire order (one writer task,
    one reader task); they do no I/O."""

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        limiter: RateLimiter | None = None,
    ):
        if len(send_key) != 32 or len(recv_key) != 32:
            raise ValueError("channel keys are 32 bytes")
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.max_frame = max_frame
        self.limiter = limiter
        self.send_counter = 0
        self.last_received = -1

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")

    def _next_header(self, size: int, frame_type: int) -> tuple[int, bytes]:
        if size > self.max_frame:
            raise FrameTooLarge(f"message of {size} bytes is over the {self.max_frame}-byte frame limit")
        if self.send_counter >= MAX_COUNTER:
            raise ChannelError("frame counter exhausted: the link must be re-established")
        counter = self.send_counter
        self.send_counter += 1
        return counter, HEADER.pack(FRAME_VERSION, frame_type, counter)

    def seal(self, plaintext: bytes, frame_type: int = TYPE_DATA) -> bytes:
        counter, header = self._next_header(len(plaintext), frame_type)
        return header + self._send.encrypt(self._nonce(counter), plaintext, header)

    def seal_parts(self, parts, frame_type: int = TYPE_DATA) -> bytearray:
        """The frame seal() makes of the concatenated `parts` (bytes-like), with fewer copies: the parts are
        joined once, right before encryption (while they are in cache), and the ciphertext is written
        straight into the frame behind its header instead of being copied there."""
        plaintext = b"".join(parts)
        size = len(plaintext)
        counter, header = self._next_header(size, frame_type)
        frame = bytearray(HEADER.size + size + TAG_LEN)
        frame[: HEADER.size] = header
        self._send.encrypt_into(self._nonce(counter), plaintext, header, memoryview(frame)[HEADER.size :])
        return frame

    def open(self, frame: bytes) -> tuple[int, bytes]:
        """Return (type, plaintext) or raise FrameRejected (drop it) / RateLimitExceeded (close the link)."""
        size = len(frame)
        if size < OVERHEAD:
            raise FrameRejected("malformed", f"frame of {size} bytes is shorter than a header")
        if size > self.max_frame + OVERHEAD:
            raise FrameRejected("oversize", f"frame of {size} bytes is over the limit")
        if self.limiter is not None and not self.limiter.admit(size):
            raise FrameRejected("rate_limited", "frame dropped: peer is over its rate limit")
        version, frame_type, counter = HEADER.unpack_from(frame)
        if version != FRAME_VERSION or frame_type not in FRAME_TYPES:
            raise FrameRejected("malformed", f"unknown frame version {version} or type {frame_type}")
        if counter <= self.last_received:
            raise FrameRejected("replay", f"stale frame counter {counter} (last {self.last_received})")
        try:
            view = memoryview(frame)  # no copy of the ciphertext before decrypting it
            plaintext = self._recv.decrypt(self._nonce(counter), view[HEADER.size :], view[: HEADER.size])
        except InvalidTag:
            raise FrameRejected("auth", "frame failed authentication (tampered or forged)") from None
        self.last_received = counter
        return frame_type, plaintext
