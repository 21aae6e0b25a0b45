"""The resource guard as a state machine fed with CPU/RAM samples (no psutil here, so it is testable).

Sharing pauses when CPU or RAM has stayed above its threshold for `sustain_secs` (a single spike does
not flap it), and resumes only after both have stayed at or below their thresholds for `cooldown_secs`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GuardSettings:
    cpu_threshold: float
    ram_threshold: float
    cooldown_secs: float
    sustain_secs: float


class ResourceGuard:
    def __init__(self, settings: GuardSettings):
        self.settings = settings
        self.paused = False
        self.cpu_percent: float | None = None
        self.ram_percent: float | None = None
        self.reason = ""
        self._over_since: float | None = None
        self._under_since: float | None = None
        self.paused_at: float | None = None
        self.last_sample_at: float | None = None

    def observe(self, cpu_percent: float, ram_percent: float, now: float) -> bool:
        """Feed one sample; returns whether sharing is paused after it."""
        s = self.settings
        self.cpu_percent, self.ram_percent, self.last_sample_at = cpu_percent, ram_percent, now
        over = []
        if cpu_percent > s.cpu_threshold:
            over.append(f"CPU {cpu_percent:.0f}% > {s.cpu_threshold:g}%")
        if ram_percent > s.ram_threshold:
            over.append(f"RAM {ram_percent:.0f}% > {s.ram_threshold:g}%")
        if over:
            self._under_since = None
            if self._over_since is None:
                self._over_since = now
            if not self.paused and now - self._over_since >= s.sustain_secs:
                self.paused, self.paused_at = True, now
            if self.paused:
                self.reason = ", ".join(over)
        else:
            self._over_since = None
            if self._under_since is None:
                self._under_since = now
            if self.paused and now - self._under_since >= s.cooldown_secs:
                self.paused, self.paused_at, self.reason = False, None, ""
            elif self.paused:
                left = s.cooldown_secs - (now - self._under_since)
                self.reason = f"cooling down: back under thresholds, resuming in {left:.0f}s"
        return self.paused

    def resume_in(self, now: float) -> float | None:
        if not self.paused or self._under_since is None:
            return None
        return max(0.0, self.settings.cooldown_secs - (now - self._under_since))

    def snapshot(self, now: float) -> dict:
        s = self.settings
        return {
            "sharing_paused": self.paused,
            "reason": self.reason or None,
            "cpu_percent": self.cpu_percent,
            "ram_percent": self.ram_percent,
            "cpu_threshold": s.cpu_threshold,
            "ram_threshold": s.ram_threshold,
            "cooldown_secs": s.cooldown_secs,
            "sustain_secs": s.sustain_secs,
            "resume_in_secs": self.resume_in(now),
            "last_sample_age_secs": None
            if self.last_sample_at is None
            else round(now - self.last_sample_at, 3),
        }
