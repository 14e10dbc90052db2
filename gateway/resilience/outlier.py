"""Outlier ejection and cooling of one upstream (Envoy's outlier detection, LiteLLM's cooldown).

After `consecutive_failures` failures in a row that are the upstream's fault it is ejected
for `base_ejection_s` x the times it has been ejected (at most `max_ejection_s`). When that
passes, one request is let through as a probe (half-open): its success restores the
upstream, its failure ejects it again for longer. Failures that are the caller's (its own
short deadline, a disconnect) are never reported here.

Overload is not an outage: an upstream that says it is busy (429, or 503/529 with
Retry-After) is *cooling* until the time it asked for, never ejected. Neither state blacks a
route out: which target a request goes to while its upstreams are out is `passed_over`'s call.

The methods that change state return what changed (an `Ejection`, a cooling time, a restore),
so the caller can log and count it; this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.config import OutlierPolicy

DEFAULT_COOLING_S = 1.0  # a 429 that does not say for how long


@dataclass(frozen=True, slots=True)
class Ejection:
    reason: Literal["failures", "probe_failed"]
    failures: int  # in a row, that led to it (1 for a failed probe)
    duration_s: float


@dataclass(frozen=True, slots=True)
class Standing:
    """Whether an upstream takes requests now: `out` is None when it does, else why not and
    until when (on the loop's clock)."""

    out: Literal["ejected", "cooling"] | None
    until: float = 0.0


IN = Standing(None)


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self.failures = 0  # in a row
        self.ejections = 0  # since the last success
        self.ejected_until = 0.0
        self.cooling_until = 0.0
        self._probing = False

    def ejected(self, now: float) -> bool:
        return self.ejections > 0 and (now < self.ejected_until or self._probing)

    def standing(self, now: float) -> Standing:
        """Out while ejected (a probe is due once the ejection ends) or cooling."""
        if self.ejections > 0 and (now < self.ejected_until or self._probing):
            return Standing("ejected", self.ejected_until)
        if now < self.cooling_until:
            return Standing("cooling", self.cooling_until)
        return IN

    def admit(self, now: float) -> bool:
        """May a request go to this upstream now? Claims the probe when one is due."""
        if self.ejections == 0:
            return True
        if now < self.ejected_until or self._probing:
            return False
        self._probing = True
        return True

    def retry_after(self, now: float) -> float:
        """Seconds until a probe may go: what a client is told when nothing else is left."""
        return max(0.0, self.ejected_until - now)

    def success(self) -> bool:
        """An answer that proves the upstream works; True if that restores it."""
        restored = self.ejections > 0
        self.failures = self.ejections = 0
        self.ejected_until = 0.0
        self._probing = False
        return restored

    def failure(self, now: float) -> Ejection | None:
        """A failure that is the upstream's fault; the ejection it causes, if any."""
        if self._probing:  # the probe failed: out again, for longer
            self._probing = False
            return self._eject(now, "probe_failed", 1)
        if now >= self.ejected_until:  # not a straggler sent before the ejection
            self.failures += 1
            if self.failures >= self.policy.consecutive_failures:
                return self._eject(now, "failures", self.failures)
        return None

    def overloaded(self, now: float, retry_after_s: float | None) -> float | None:
        """The upstream said it is busy: cool it for what it asked (bounded by
        `max_ejection_s`). Returns the cooling time if it starts cooling now (None if it
        already was, so one busy spell is one log line)."""
        self._probing = False  # it answered: the next request probes, if one is due
        seconds = min(
            DEFAULT_COOLING_S if retry_after_s is None else retry_after_s,
            self.policy.max_ejection_s,
        )
        was_cooling = now < self.cooling_until
        self.cooling_until = max(self.cooling_until, now + seconds)
        return None if was_cooling or seconds <= 0 else seconds

    def neutral(self) -> None:
        """An attempt that says nothing of the upstream (the caller left or ran out of its
        own time): if it was the probe, the next request probes instead."""
        self._probing = False

    def _eject(
        self, now: float, reason: Literal["failures", "probe_failed"], failures: int
    ) -> Ejection:
        self.ejections += 1
        self.failures = 0
        duration = min(self.policy.base_ejection_s * self.ejections, self.policy.max_ejection_s)
        self.ejected_until = now + duration
        return Ejection(reason, failures, duration)


def passed_over(index: int, standings: Sequence[Standing], *, panic: bool) -> bool:
    """Whether the target at `index`, whose upstream is out, is passed over: yes while a later
    target's upstream is in (a fallback takes the request). When every one left is out, the
    request still goes to the one whose time out ends soonest (Envoy's panic routing): a
    cooling upstream always (the client gets the upstream's own answer, not ours), an ejected
    one only when `panic` (else the route fails fast with `circuit_open`)."""
    later = standings[index + 1 :]
    if any(standing.out is None for standing in later):
        return True
    candidates = [
        (standing.until, position)
        for position, standing in enumerate(standings[index:], start=index)
        if standing.out == "cooling" or (standing.out == "ejected" and panic)
    ]
    return not candidates or min(candidates)[1] != index
