"""Outlier ejection of one upstream (Envoy's outlier detection, LiteLLM's cooldown).

After `consecutive_failures` failures in a row that are the upstream's fault it is ejected
for `base_ejection_s` x the times it has been ejected (at most `max_ejection_s`). When that
passes, one request is let through as a probe (half-open): its success restores the
upstream, its failure ejects it again for longer. Failures that are the caller's (its own
short deadline, a disconnect) are never reported here.
"""

from __future__ import annotations

from gateway.config import OutlierPolicy


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy) -> None:
        self.policy = policy
        self.failures = 0  # in a row
        self.ejections = 0  # since the last success
        self.ejected_until = 0.0
        self._probing = False

    def ejected(self, now: float) -> bool:
        return self.ejections > 0 and (now < self.ejected_until or self._probing)

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

    def success(self) -> None:
        self.failures = self.ejections = 0
        self.ejected_until = 0.0
        self._probing = False

    def failure(self, now: float) -> None:
        """A failure that is the upstream's fault."""
        if self._probing:  # the probe failed: out again, for longer
            self._probing = False
            self._eject(now)
        elif now >= self.ejected_until:  # not a straggler sent before the ejection
            self.failures += 1
            if self.failures >= self.policy.consecutive_failures:
                self._eject(now)

    def neutral(self) -> None:
        """An attempt that says nothing of the upstream (the caller left or ran out of its
        own time): if it was the probe, the next request probes instead."""
        self._probing = False

    def _eject(self, now: float) -> None:
        self.ejections += 1
        self.failures = 0
        duration = self.policy.base_ejection_s * self.ejections
        self.ejected_until = now + min(duration, self.policy.max_ejection_s)
